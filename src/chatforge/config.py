"""The one config schema: typed dataclasses -> YAML files and dotted CLI overrides.

Every stage reads the same `Config`; each section is a dataclass whose fields carry a one-line help
text. `load_config("run.yaml", ["train.lr=1e-4", "peft.method=lora"])` validates everything before
any model loads: an unknown key, a bad type or a bad value raises `ConfigError` naming the key (with
the closest valid name for a typo).

    >>> cfg = load_config(None, ["train.lr=3e-4", "peft.method=lora"])
    >>> cfg.train.lr, cfg.peft.method
    (0.0003, 'lora')
    >>> load_config(None, ["train.lrr=1"])
    Traceback (most recent call last):
    ...
    chatforge.errors.ConfigError: unknown config key 'train.lrr' (did you mean 'train.lr'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.errors import ConfigError
from chatforge.tracking import TRACKERS


def opt(default: Any, help: str, choices: tuple | None = None) -> Any:  # noqa: A002
    """A config field with a help line and, optionally, the allowed values."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = opt(
        "default", "local HF dir, a .gguf file, a hub id (when online), or 'default' (SmolLM2-135M-Instruct)"
    )
    dtype: str = opt(
        "auto",
        "weight dtype; auto = bfloat16 where the device supports it, else float32",
        ("auto", "float32", "bfloat16", "float16"),
    )
    trust_remote_code: bool = opt(False, "allow model code from the model dir (off unless you trust it)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    attn_implementation: str = opt(
        "sdpa", "attention kernel passed to transformers", ("sdpa", "eager", "flash_attention_2")
    )


@dataclass
class DataConfig:
    train: list[str] = opt([], "training files (JSONL, JSON, CSV, Parquet, datasets dir, .txt) or hub names")
    eval: list[str] = opt([], "evaluation files (optional)")
    max_length: int = opt(512, "maximum tokens per example; longer ones are truncated and counted")
    packing: bool = opt(False, "pack several short examples per row (no attention across examples)")
    pad_to_multiple_of: int = opt(
        16,
        "training batches are padded to a multiple of this many tokens (1: to the longest row); kernels "
        "are built and cached per shape, so free widths grow a CPU process by ~10-16 MB per new width",
    )
    assistant_only_loss: bool = opt(True, "train only on assistant tokens; false trains on every token")
    eval_fraction: float = opt(0.0, "hold out this fraction of data.train for eval when data.eval is empty")
    share_prompt: str = opt(
        "auto",
        "rows with one prompt (rm/dpo pairs, grpo groups) become one row: the prompt once, each "
        "response attending to it and itself (fewer tokens); auto = on where the model passes an exactness probe",
        ("auto", "on", "off"),
    )


@dataclass
class PeftConfig:
    method: str = opt(
        "lora", "adapter kind, or none for full fine-tuning", ("none", "lora", "qlora", "prefix", "prompt")
    )
    r: int = opt(16, "LoRA rank")
    alpha: int = opt(32, "LoRA alpha (scale = alpha / r)")
    dropout: float = opt(0.0, "LoRA dropout (forced to 0 in RL stages so log-probs are deterministic)")
    target_modules: list[str] = opt(
        [], "module names to adapt; empty = attention projections found per architecture"
    )
    num_virtual_tokens: int = opt(16, "virtual tokens for prefix and prompt tuning")


@dataclass
class TrainConfig:
    output_dir: str = opt("runs/chatforge", "where checkpoints, metrics, logs and final/ go")
    max_steps: int = opt(0, "optimizer steps; 0 = run train.epochs epochs")
    epochs: float = opt(1.0, "passes over the data when max_steps is 0")
    batch_size: int = opt(4, "examples per micro-batch per device")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(2e-4, "peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_ratio: float = opt(0.03, "fraction of steps spent warming the learning rate up")
    scheduler: str = opt("cosine", "learning-rate decay after warmup", ("cosine", "linear", "constant"))
    max_grad_norm: float = opt(1.0, "gradient clipping norm; 0 disables")
    loss_reduction: str = opt(
        "token", "how per-token losses are averaged over the global batch", ("token", "sequence")
    )
    mixed_precision: str = opt(
        "auto",
        "autocast dtype for fp32 weights; auto = bf16 where supported",
        ("auto", "none", "bf16", "fp16"),
    )
    seed: int = opt(42, "seed for data order, dropout and initialisation")
    log_every: int = opt(1, "log metrics every N steps")
    eval_every: int = opt(0, "evaluate every N steps; 0 = only at the end")
    save_every: int = opt(0, "checkpoint every N steps; 0 = only at the end")
    keep_last: int = opt(2, "checkpoints to keep (at least 1)")
    resume: bool = opt(
        False, "continue from the newest checkpoint in output_dir (refused if its config differs)"
    )
    overwrite: bool = opt(
        False, "start afresh in an output_dir that holds another run's checkpoints (deletes them)"
    )
    device: str = opt("auto", "auto, cpu, cuda, cuda:N")
    progress: bool = opt(True, "show a progress bar")
    report_to: list[str] = opt(
        ["tensorboard"],
        "experiment trackers the metrics also go to: tensorboard (OUTPUT/tensorboard), wandb, mlflow, "
        "trackio, or none; all but tensorboard are extras, e.g. pip install 'chatforge[wandb]'",
    )
    project: str = opt("chatforge", "tracker project: the wandb/trackio project, the mlflow experiment")


@dataclass
class PretrainConfig:
    preset: str = opt(
        "", "model size when training from scratch: a preset (chatforge.plan.scaling.PRESETS) or WIDTHxDEPTH"
    )
    tokenizer: str = opt("default", "tokenizer source: a model dir, .gguf file, or 'default'")
    tokens_per_param: float = opt(20.0, "token budget per parameter when train.max_steps is 0 (Chinchilla)")


@dataclass
class RewardConfig:
    center_coef: float = opt(0.0, "weight of the (r_chosen + r_rejected)^2 term that keeps rewards near zero")


@dataclass
class DPOConfig:
    loss_type: str = opt("sigmoid", "preference loss", ("sigmoid", "ipo", "hinge", "simpo"))
    beta: float = opt(0.1, "inverse temperature of the implicit reward")
    label_smoothing: float = opt(0.0, "cDPO label smoothing in [0, 0.5) (sigmoid and simpo losses)")
    simpo_gamma: float = opt(0.5, "SimPO target reward margin")
    sft_weight: float = opt(0.0, "weight of an NLL term on the chosen response")
    precompute_ref: bool = opt(
        False, "compute reference log-probs once before training (full fine-tuning then holds one model)"
    )


@dataclass
class GenerateConfig:
    max_new_tokens: int = opt(32, "tokens generated per response")
    temperature: float = opt(1.0, "sampling temperature")
    top_p: float = opt(1.0, "nucleus sampling threshold")
    top_k: int = opt(0, "top-k sampling; 0 disables")
    seed_per_row: bool = opt(
        False,
        "GRPO rollouts: each answer's random draws come from train.seed, the step and the answer's "
        "place in the step's global batch, so the same answers come out whatever "
        "grpo.generation_batch_size or the number of processes",
    )
    merge_lora: str = opt(
        "auto",
        "RL rollouts: sample with the LoRA adapter folded into a copy of the weights (1.25x faster "
        "decoding on CPU for LoRA on q,k,v,o; one extra copy of the adapted weights); auto = on for CPU only",
        ("auto", "on", "off"),
    )


@dataclass
class PPOConfig:
    reward_model: str = opt("", "reward model dir (stage 2 output); empty uses ppo.reward_functions")
    reward_functions: list[str] = opt(
        [], "rule rewards: built-in names or module:function / file.py:function"
    )
    reward_weights: list[float] = opt([], "weights of the reward functions (default 1 each)")
    rollout_batch_size: int = opt(16, "prompts per rollout (x ppo.samples_per_prompt answers)")
    samples_per_prompt: int = opt(
        1, "answers sampled per prompt, adjacent in the rollout; >= 2 for the group estimators"
    )
    advantage: str = opt(
        "gae",
        "advantage estimator (chatforge.rl.advantages): gae needs a critic; rloo, group_norm and "
        "reinforce_pp_baseline compare the answers to one prompt; reinforce_pp whitens returns globally",
        ("gae", "group_norm", "rloo", "reinforce_pp", "reinforce_pp_baseline"),
    )
    ppo_epochs: int = opt(2, "passes over each rollout")
    mini_batch_size: int = opt(8, "sequences per optimizer step within a rollout")
    clip_eps: float = opt(0.2, "policy ratio clip")
    value_clip_eps: float = opt(0.2, "value clip")
    vf_coef: float = opt(0.5, "value loss weight")
    kl_coef: float = opt(0.05, "per-token KL penalty coefficient (initial value when adaptive)")
    kl_estimator: str = opt("k1", "KL estimate in the reward", ("k1", "k3"))
    kl_target: float = opt(0.0, "adaptive KL target; 0 keeps kl_coef fixed")
    kl_horizon: int = opt(10000, "adaptive KL horizon")
    gamma: float = opt(1.0, "GAE discount")
    lam: float = opt(0.95, "GAE lambda")
    whiten_advantages: bool = opt(True, "normalise advantages per rollout")
    score_clip: float = opt(0.0, "clip sequence scores to +-this; 0 disables")
    missing_eos_penalty: float = opt(0.0, "subtracted from the score of responses that never stop")
    ptx_coef: float = opt(0.0, "weight of a pretraining (SFT) loss mixed into each step")
    critic_lr: float = opt(0.0, "critic learning rate; 0 = train.lr")
    offload_frozen: bool = opt(
        False, "full fine-tuning: park reference and reward models on CPU between phases"
    )
    samples_every: int = opt(5, "write sample completions every N steps")
    critic_init: str = opt(
        "base",
        "critic start: fresh LoRA on the base, or the reward model's adapter and head",
        ("base", "reward"),
    )
    critic: str = opt(
        "auto",
        "value model: its own LoRA adapter (or model copy) + value head; head = a value head on the "
        "actor's hidden states, no gradient into the actor: no critic passes, a third less compute; "
        "auto = adapter for ppo.advantage=gae, none for the critic-free estimators",
        ("auto", "adapter", "head"),
    )
    forward_batch_size: int = opt(
        64, "sequences per no-grad forward pass when building experience (lower it if memory is tight)"
    )
    ptx_data: list[str] = opt([], "SFT data files for the pretraining-loss mix (used when ptx_coef > 0)")
    generation_batch_size: int = opt(0, "prompts generated per batch; 0 = the whole rollout at once")
    layout: str = opt(
        "auto",
        "auto: one shared base with LoRA/QLoRA, separate models for full fine-tuning; separate: always",
        ("auto", "separate"),
    )


@dataclass
class GRPOConfig:
    num_generations: int = opt(8, "answers sampled per prompt")
    beta: float = opt(0.04, "KL (k3) weight in the loss; 0 holds no reference")
    clip_eps: float = opt(0.2, "policy ratio clip")
    scale_rewards: bool = opt(True, "divide group-centred rewards by the group std")
    loss_aggregation: str = opt(
        "token",
        "how token losses are averaged: token = over every token of the global batch (DAPO), "
        "sequence = mean of per-answer means (GRPO paper), dr_grpo = sum over a constant "
        "answers x generate.max_new_tokens (Dr. GRPO)",
        ("token", "sequence", "dr_grpo"),
    )
    prompts_per_step: int = opt(4, "prompts per step (x num_generations completions)")
    epochs_per_step: int = opt(1, "passes over each batch of completions")
    reward_functions: list[str] = opt(["exact_match"], "built-in names or module:function / file.py:function")
    reward_weights: list[float] = opt([], "weights of the reward functions (default 1 each)")
    reward_model: str = opt("", "optional reward model dir added to the rule rewards")
    reward_model_weight: float = opt(1.0, "weight of the reward model's normalised score")
    generation_batch_size: int = opt(0, "completions generated per batch; 0 = all of a step at once")
    samples_every: int = opt(5, "write sample completions to samples.jsonl every N steps; 0 = never")


@dataclass
class PipelineConfig:
    stages: list[str] = opt([], "stages in order, e.g. [sft, rm, ppo] or [sft, dpo] or [sft, grpo]")
    overrides: dict = opt({}, "per-stage overrides: {stage: {dotted.key: value}}")
    task: str = opt("", "built-in task whose data the pipeline writes first (chatforge.data.tasks)")
    task_seed: int = opt(0, "seed of the built-in task data")
    task_demos: str = opt(
        "steps",
        "SFT demonstrations of the built-in task: steps (worked steps then 'The answer is N', where the "
        "task has them: arithmetic) or answer (the bare answer)",
        ("steps", "answer"),
    )
    task_slips: float = opt(
        0.0,
        "fraction of the built-in task's SFT demonstrations that show a typical slip instead of the "
        "answer (preference pairs stay right): demonstrators who err where raters comparing answers "
        "do not",
    )
    task_sizes: dict = opt(
        {},
        "records per split of the task data, e.g. {sft: 2000, eval: 200}; preference_eval: held-out "
        "pairs for the reward model's accuracy and statistics (default: the eval size)",
    )
    eval_data: str = opt("", "eval JSONL (prompt, answer); default RUN/data/eval.jsonl with pipeline.task")
    eval_base: bool = opt(True, "also evaluate the starting model, before any stage")
    eval_max_new_tokens: int = opt(32, "answer length limit in evaluation (greedy decoding)")
    eval_batch_size: int = opt(16, "prompts per generation batch in evaluation")
    eval_limit: int = opt(0, "evaluate only the first N eval items; 0 = all")
    samples: int = opt(6, "sample answers the report shows for each model against the one before it")
    sft_same_time: bool = opt(
        False,
        "also train the SFT model on with SFT for the wall time the stages after SFT took, and report "
        "it as 'SFT only, same total training time' (did RL earn its cost?)",
    )


@dataclass
class DistConfig:
    strategy: str = opt(
        "auto",
        "how several processes share the model: ddp (each holds it all), fsdp2 (torch fully_shard: "
        "parameters, gradients and optimizer state sharded), zero2/zero3 (DeepSpeed); auto = ddp when "
        "several processes, nothing when one",
        ("auto", "ddp", "fsdp2", "zero2", "zero3"),
    )
    offload: str = opt(
        "none",
        "keep optimizer states (optimizer) or parameters too (all) in CPU memory between uses",
        ("none", "optimizer", "all"),
    )
    reshard_after_forward: bool = opt(
        True, "fsdp2: free each layer's gathered parameters after its forward (less memory, one more gather)"
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    rm: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    dist: DistConfig = field(default_factory=DistConfig)


# Value checks that types alone cannot express: (key, predicate, what it must be).
_RULES = [
    ("data.max_length", lambda v: v > 0, "a positive integer"),
    ("data.pad_to_multiple_of", lambda v: v > 0, "a positive integer"),
    ("train.batch_size", lambda v: v > 0, "a positive integer"),
    ("train.grad_accum", lambda v: v > 0, "a positive integer"),
    ("train.max_steps", lambda v: v >= 0, "0 or a positive integer"),
    ("train.epochs", lambda v: v > 0, "a positive number"),
    ("train.lr", lambda v: v > 0, "a positive number"),
    ("train.log_every", lambda v: v > 0, "a positive integer"),
    ("train.eval_every", lambda v: v >= 0, "0 or a positive integer"),
    ("train.save_every", lambda v: v >= 0, "0 or a positive integer"),
    ("train.keep_last", lambda v: v >= 1, "at least 1 (the newest checkpoint is what a resume needs)"),
    ("train.device", lambda v: _DEVICE.match(v) is not None, "auto, cpu, cuda, cuda:N, mps or xpu[:N]"),
    ("train.warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
    (
        "train.report_to",
        lambda v: set(v) <= {*TRACKERS, "none"} and not ("none" in v and len(v) > 1),
        f"a list of {', '.join(TRACKERS)}, or none",
    ),
    ("peft.r", lambda v: v > 0, "a positive integer"),
    ("peft.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("data.eval_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("generate.max_new_tokens", lambda v: v > 0, "a positive integer"),
    ("generate.temperature", lambda v: v > 0, "a positive number"),
    ("generate.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("pipeline.task_slips", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("grpo.num_generations", lambda v: v >= 2, "at least 2 (groups need two answers to compare)"),
]


_DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def all_keys(cls=Config) -> list[str]:
    """Every dotted key of the schema, e.g. 'train.lr'."""
    return [f"{s}.{k}" for s, sf in _fields(cls).items() for k in _fields(sf.default_factory)]


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any, choices: tuple | None) -> Any:
    """Check `value` against the annotation `tp`; accept ints for floats and a scalar for a list."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        items = value if isinstance(value, (list, tuple)) else ([] if value in (None, "") else [value])
        return [_coerce(f"{key}[{i}]", v, item_tp, None) for i, v in enumerate(items)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping (got {value!r})")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(key, value, args[0], choices)
    if tp in (int, float) and isinstance(value, str):
        # YAML reads '3e-4' as a string; numbers written that way are still numbers
        try:
            value = tp(value)
        except ValueError:
            pass
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool))
        or tp is Any
    )
    if not ok:
        raise ConfigError(f"{key} must be {_type_name(tp)} (got {value!r})")
    value = float(value) if tp is float else str(value) if tp is str else value
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number (got {value!r})")
    if choices and value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))} (got {value!r})")
    return value


class _Raw(str):
    """An override value as typed on the command line, parsed once its field's type is known."""

    def parse(self, tp: Any) -> Any:
        import yaml

        if tp is str:
            return str(self)  # keep 'no', 'on', '1e-4' as written for string fields
        try:
            return yaml.safe_load(self) if self.strip() else ""
        except yaml.YAMLError:
            return str(self)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    return key.strip(), _Raw(raw)


def _flatten(tree: dict, where: str) -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; sections must be mappings."""
    flat = {}
    for section, body in tree.items():
        if section not in _fields(Config):
            raise _unknown(str(section))
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping of keys")
        for k, v in body.items():
            flat[f"{section}.{k}"] = v
    return flat


def read_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: a config file must be a mapping of sections")
    return tree


def build_config(values: dict[str, Any]) -> Config:
    """A validated `Config` from flat dotted keys."""
    cfg = Config()
    for key, value in values.items():
        section, _, name = key.partition(".")
        if section not in _fields(Config) or name not in _fields(type(getattr(cfg, section))):
            raise _unknown(key)
        f = _fields(type(getattr(cfg, section)))[name]
        tp = typing.get_type_hints(type(getattr(cfg, section)))[name]
        if isinstance(value, _Raw):
            value = value.parse(tp)
        setattr(getattr(cfg, section), name, _coerce(key, value, tp, f.metadata.get("choices")))
    for key, ok, what in _RULES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            raise ConfigError(f"{key} must be {what} (got {value!r})")
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None) and apply `key=value` overrides."""
    values = _flatten(read_yaml(path), str(path)) if path else {}
    for item in overrides:
        key, value = _parse_override(item)
        values[key] = value
    return build_config(values)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_flat(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, body in to_dict(cfg).items() for k, v in body.items()}


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the effective config as YAML (the file `load_config` reads back to the same config)."""
    import yaml

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(sections: tuple[str, ...] | None = None) -> str:
    """Every key with its type, default and help line, for `chatforge STAGE --help`."""
    lines = []
    for section, sf in _fields(Config).items():
        if sections and section not in sections:
            continue
        cls = sf.default_factory
        hints = typing.get_type_hints(cls)
        lines.append(f"{section}:")
        for name, f in _fields(cls).items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            kind = "|".join(choices) if choices else _type_name(hints[name])
            lines.append(f"  {section}.{name} ({kind}, default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)
