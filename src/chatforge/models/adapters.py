"""Parameter-efficient fine-tuning through peft: LoRA, QLoRA, prefix tuning, prompt tuning.

`apply_peft(model, peft_cfg)` returns the model to train (a `PeftModel`, or the model itself for
full fine-tuning with every parameter trainable). Saved adapters load unchanged with
`PeftModel.from_pretrained`; `merge_adapter` writes a full model that `from_pretrained` loads.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# Attention projections per architecture family, matched against leaf module names.
_ATTENTION_NAMES = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # llama, qwen2, mistral, gemma, phi3-like
    ("q_proj", "k_proj", "v_proj", "out_proj"),  # opt
    ("query_key_value", "dense"),  # bloom, falcon, gpt-neox
    ("c_attn", "c_proj"),  # gpt2 (c_proj also names the MLP output; both are adapted)
    ("qkv_proj", "o_proj"),  # phi3
)


def leaf_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}


def default_target_modules(model) -> list[str] | str:
    """The attention projections of `model`, or peft's 'all-linear' for unknown layouts."""
    names = leaf_names(model)
    for group in _ATTENTION_NAMES:
        if all(n in names for n in group):
            return list(group)
    return "all-linear"


def check_target_modules(model, targets: list[str]) -> None:
    """Each `peft.target_modules` entry names modules of `model` (a leaf name or a dotted suffix,
    as peft matches them), else a one-line error listing the linear layers there are."""
    import torch

    from chatforge.errors import ConfigError

    names = [n for n, _ in model.named_modules() if n]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            linear = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            )
            kind = getattr(model.config, "model_type", "this")
            raise ConfigError(
                f"peft.target_modules: no module named {target!r} in this {kind} model; "
                f"its linear layers are {', '.join(linear)}"
            )


def lora_config(pcfg, model, dropout: float | None = None):
    from peft import LoraConfig, TaskType

    targets = list(pcfg.target_modules) or default_target_modules(model)
    if pcfg.target_modules:
        check_target_modules(model, targets)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=pcfg.r,
        lora_alpha=pcfg.alpha,
        lora_dropout=pcfg.dropout if dropout is None else dropout,
        target_modules=targets,
        bias="none",
    )


def peft_config(pcfg, model, dropout: float | None = None):
    """The peft config for `peft.method` (None for full fine-tuning)."""
    from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType

    if pcfg.method in ("lora", "qlora"):
        return lora_config(pcfg, model, dropout)
    if pcfg.method == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=pcfg.num_virtual_tokens)
    if pcfg.method == "prompt":
        return PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=pcfg.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.RANDOM,
        )
    return None


def apply_peft(model, pcfg, gradient_checkpointing: bool = False, dropout: float | None = None):
    """Wrap `model` for training per `peft.method`; `dropout` overrides peft.dropout (RL uses 0)."""
    if pcfg.method == "none":
        model.requires_grad_(True)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if pcfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        # Frozen embeddings give the checkpointed blocks inputs without grad; this restores the graph.
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config(pcfg, model, dropout))


def is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def trainable_summary(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable parameters: {train:,} of {total:,} ({100 * train / max(total, 1):.2f}%)"


def save_final(model, tokenizer, out_dir: str | Path) -> Path:
    """Save what the ecosystem loads: an adapter dir for peft models, else a full model dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_portable_fields(out)
    if is_adapter_dir(out):
        record_portable_base(out)
    return out


def hub_id_of(path: str) -> str | None:
    """The hub id a local model dir stands for: the embedded default's, or that of a hub-cache
    snapshot (`.../models--ORG--NAME/snapshots/REV`); None for any other dir.

    >>> hub_id_of("/h/hub/models--Qwen--Qwen2-0.5B/snapshots/abc")
    'Qwen/Qwen2-0.5B'
    >>> hub_id_of("/runs/sft/merged") is None
    True
    """
    from chatforge.models.load import DEFAULT_HUB_ID, default_model_dir

    p = Path(path)
    if p.exists() and p.resolve() == default_model_dir().resolve():
        return DEFAULT_HUB_ID
    parts = p.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        org, _, name = parts[-3][len("models--") :].partition("--")
        return f"{org}/{name}" if name else None
    return None


def portable_base(base: str, adapter_dir: Path) -> str:
    """What an adapter records as its base: the hub id when known, else the base dir relative to
    the adapter dir (the pair moves together), else (no common folder but the root) absolute.

    >>> portable_base("Qwen/Qwen2-0.5B", Path("/runs/a/final"))
    'Qwen/Qwen2-0.5B'
    """
    if not Path(base).exists():
        return base  # a hub id (or a path already portable)
    hub = hub_id_of(base)
    if hub:
        return hub

    real, here = os.path.realpath(base), os.path.realpath(adapter_dir)
    try:
        shared = os.path.commonpath([real, here])
    except ValueError:  # another drive
        return real
    return real if shared == os.path.abspath(os.sep) else os.path.relpath(real, here)


BASE_FILE = "chatforge_base.json"  # beside adapter_config.json: the base relative to the adapter


def record_portable_base(adapter_dir: Path) -> None:
    """Record the base so the adapter loads anywhere: a hub id in `base_model_name_or_path`; a local
    base stays absolute there (peft's AutoPeftModel reads that field from any working directory),
    and `chatforge_base.json` adds its path relative to the adapter, used when the run has moved."""
    import json

    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        return
    portable = portable_base(base, adapter_dir)
    if Path(base).exists() and not Path(portable).is_absolute() and not hub_id_of(base):
        (adapter_dir / BASE_FILE).write_text(json.dumps({"relative": portable}) + "\n")
        portable = os.path.realpath(base)
    cfg["base_model_name_or_path"] = portable
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model of a saved adapter as `load_model` takes it: a recorded relative path is
    read from the adapter dir, the embedded default's hub id means `default`; a base that is not
    there is a one-line error naming the adapter and what to do."""
    import json

    from chatforge.errors import ConfigError
    from chatforge.models.load import DEFAULT_HUB_ID, HUB_ID

    config = Path(adapter_dir) / "adapter_config.json"
    base = json.loads(config.read_text()).get("base_model_name_or_path") or ""
    recorded = Path(adapter_dir) / BASE_FILE
    relative = json.loads(recorded.read_text()).get("relative", "") if recorded.is_file() else base
    beside = Path(adapter_dir) / relative
    moved = not Path(base).is_dir() and relative and not Path(relative).is_absolute()
    if moved and (beside / "config.json").is_file():
        return str(beside)
    if base == DEFAULT_HUB_ID:
        return "default"
    if Path(base).exists() or (HUB_ID.match(base) and not base.startswith(".")):
        return base
    also = f", nor {relative!r} relative to the adapter ({BASE_FILE})" if relative != base else ""
    raise ConfigError(
        f"{config}: base model {base!r} (base_model_name_or_path) not found{also}; put the base there "
        "or set that field to a local model dir or a hub id"
    )


def write_portable_fields(out: Path) -> None:
    """Make a dir written by transformers 5 load the same in transformers 4.x: 4.x reads RoPE from
    `rope_theta` / `rope_scaling` (without them it silently uses theta 10000) and cannot import
    the tokenizer class name `TokenizersBackend` (its fast tokenizer is `PreTrainedTokenizerFast`).
    Both versions read the added fields the same way; nothing else changes."""
    import json

    config = out / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        rope = c.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in c:
            c["rope_theta"] = rope["rope_theta"]
            extra = {k: v for k, v in rope.items() if k != "rope_theta"}
            if extra.get("rope_type", "default") != "default":
                c.setdefault("rope_scaling", extra)
            config.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    tok = out / "tokenizer_config.json"
    if tok.is_file():
        t = json.loads(tok.read_text())
        if t.get("tokenizer_class") == "TokenizersBackend":
            t["tokenizer_class"] = "PreTrainedTokenizerFast"
            tok.write_text(json.dumps(t, indent=2, ensure_ascii=False) + "\n")


def load_adapter_model(adapter_dir: str | Path, dtype=None, device=None, is_trainable: bool = False):
    """Base model (`adapter_base`) + saved adapter."""
    from peft import PeftModel

    from chatforge.models.load import load_model

    base = load_model(adapter_base(adapter_dir), dtype=dtype, device=device)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, dtype=None) -> Path:
    """Fold a LoRA adapter into its base weights and save a plain transformers model dir.

    Prefix and prompt tuning have no weights to fold: their adapter dir is the deliverable.
    """
    import torch

    from chatforge.errors import ChatforgeError
    from chatforge.models.load import load_tokenizer

    if not is_adapter_dir(adapter_dir):
        raise ChatforgeError(f"{adapter_dir}: no adapter_config.json (not a peft adapter dir)")
    model = load_adapter_model(adapter_dir, dtype=dtype or torch.float32)
    if model.peft_config["default"].peft_type.value != "LORA":
        raise ChatforgeError(f"{adapter_dir}: only LoRA adapters can be merged (prefix/prompt tuning cannot)")
    merged = model.merge_and_unload()
    tok = load_tokenizer(str(adapter_dir))
    return save_final(merged, tok, out_dir)


def mergeable_lora_layers(model, adapter: str) -> list | None:
    """[(parent, attribute name, lora layer)] for every layer carrying `adapter`, or None when one of
    them cannot be folded into its base weight (quantised base, DoRA, a non-Linear layer)."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if not isinstance(child, LoraLayer) or adapter not in child.lora_A:
                continue
            if type(child) is not LoraLinear or child.use_dora.get(adapter, False):
                return None
            found.append((parent, name, child))
    return found


@contextlib.contextmanager
def merged_lora(peft_model, adapter: str):
    """Yield the plain transformers model with LoRA `adapter` folded into its weights, or None.

    Decoding small batches on a CPU is bound by per-layer overhead, and peft's LoRA layers add
    several small ops to every projection: with LoRA on q,k,v,o, 16 prompts x 24 tokens of
    SmolLM2-135M took 1.97 s through peft and 1.57 s folded (merge included). Inside this context each adapted projection is its bare base layer holding
    W + scale * B @ A in a new tensor; on exit the original weight tensors and the peft layers are
    put back untouched (never W + delta - delta, which would drift in bf16). Costs one extra copy of
    the adapted weights while it is open. None (nothing changed) when the adapter cannot be folded:
    then generate through the peft model as usual.
    """
    import torch

    layers = mergeable_lora_layers(peft_model, adapter)
    if not layers:
        yield None
        return
    saved = []
    try:
        with torch.no_grad():
            for parent, name, lora in layers:
                base = lora.get_base_layer()
                weight = base.weight.data
                saved.append((parent, name, lora, base, weight))
                base.weight.data = weight + lora.get_delta_weight(adapter).to(weight.dtype)
                setattr(parent, name, base)
        yield peft_model.get_base_model()
    finally:
        for parent, name, lora, base, weight in reversed(saved):
            base.weight.data = weight
            setattr(parent, name, lora)


def merge_for_generation(setting: str, device) -> bool:
    """generate.merge_lora: on, off, or auto (on for CPU, where decoding is overhead-bound and a
    weight copy is cheap; off on accelerators, where memory is the scarcer resource)."""
    if setting == "auto":
        return getattr(device, "type", str(device)) == "cpu"
    return setting == "on"


@contextlib.contextmanager
def sampling_model(lm, merge: bool):
    """The model to sample from: `lm` itself, or with its active LoRA adapter folded in (`merged_lora`)."""
    if not (merge and is_peft_model(lm)):
        yield lm
        return
    # the LoRA model's own record (roles switch it directly); prompt learning has no such list
    active = getattr(lm.base_model, "active_adapters", None)
    if not isinstance(active, (list, tuple)) or len(active) != 1:
        yield lm
        return
    with merged_lora(lm, active[0]) as merged:
        yield lm if merged is None else merged
