"""The config schema: one typed dataclass per section, each field with its default, a one-line help
text and, where fixed, its allowed values (`opt`). `chatforge.config.load` reads and validates them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
