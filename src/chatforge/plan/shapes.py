"""Model shapes for planning: the few numbers memory and compute depend on (`ModelShape`), read from
a transformers config (LLaMA-like, GPT-2, OPT, BLOOM), a model dir, a pretrain preset or the embedded
default (`load_shape`), without loading any weights.

    >>> shape = ModelShape.from_hf_config(DEFAULT_MODEL_CONFIG)  # SmolLM2-135M
    >>> shape.n_params, shape.n_layers
    (134515008, 30)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# SmolLM2-135M-Instruct, the embedded default model (`model.path: default`).
DEFAULT_MODEL_CONFIG = dict(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
)


@dataclass(frozen=True)
class ModelShape:
    """The numbers memory depends on; `from_hf_config` fills them from a transformers config."""

    n_params: int
    n_layers: int
    hidden: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    intermediate: int
    head_dim: int = 0  # 0: hidden // n_heads
    tied_embeddings: bool = True
    gated_mlp: bool = True  # SwiGLU (gate, up, down) rather than a two-matrix MLP
    model_type: str = "llama"

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.n_heads)

    @property
    def embedding_params(self) -> int:
        """Input embedding plus an untied LM head: the weights QLoRA leaves unquantised."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """`(in, out)` of each decoder-layer linear, by LLaMA role name (fused QKV counted split)."""
        h, q, kv, i = (
            self.hidden,
            self.n_heads * self.head_dim,
            self.n_kv_heads * self.head_dim,
            self.intermediate,
        )
        shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        if self.gated_mlp:
            shapes["gate_proj"] = (h, i)
        return {**shapes, "up_proj": (h, i), "down_proj": (i, h)}

    def lora_params(self, r: int, targets: str | Iterable[str] = "all-linear") -> int:
        """Parameters of rank-`r` LoRA on `targets`: "all-linear", "attention", "mlp" or role names.

        >>> ModelShape.from_hf_config(DEFAULT_MODEL_CONFIG).lora_params(16, ["q_proj", "v_proj"])
        921600
        """
        shapes = self.linear_shapes()
        groups = {
            "all-linear": list(shapes),
            "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "mlp": ["gate_proj", "up_proj", "down_proj"],
        }
        names = groups[targets] if isinstance(targets, str) and targets in groups else targets
        names = [names] if isinstance(names, str) else list(names)
        total = 0
        for name in names:
            role = name if name.endswith("_proj") else f"{name}_proj"
            if role not in groups["all-linear"] + groups["mlp"]:
                raise ValueError(f"unknown LoRA target {name!r}; use {', '.join(groups)} or LLaMA names")
            if role in shapes:  # a two-matrix MLP has no gate_proj
                total += r * sum(shapes[role])
        return total * self.n_layers

    @classmethod
    def from_hf_config(cls, config) -> ModelShape:
        """From a transformers config object or its dict; counts parameters exactly for llama, mistral,
        qwen2, qwen3, gpt2, opt and bloom (other decoders are counted as llama-like)."""
        cfg = _Cfg(config)
        if cfg.get("text_config") is not None:  # multimodal wrappers keep the LM under text_config
            cfg = _Cfg(cfg.get("text_config"))
        model_type = cfg.get("model_type") or "llama"
        return _COUNTERS.get(model_type, _llama_like)(cfg, model_type)


class _Cfg:
    """Uniform reads from a config dict or object (objects resolve aliases like n_embd -> hidden_size)."""

    def __init__(self, config):
        self.config = config

    def get(self, *names, default=None):
        for name in names:
            value = (
                self.config.get(name) if isinstance(self.config, dict) else getattr(self.config, name, None)
            )
            if value is not None:
                return value
        return default


def _llama_like(cfg: _Cfg, model_type: str) -> ModelShape:
    h, n_layers, vocab = cfg.get("hidden_size"), cfg.get("num_hidden_layers"), cfg.get("vocab_size")
    heads = cfg.get("num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads", default=heads)
    head_dim = cfg.get("head_dim", default=h // heads)
    inter = cfg.get("intermediate_size")
    tied = bool(cfg.get("tie_word_embeddings", default=False))  # False is the llama-family default
    q, kv = heads * head_dim, kv_heads * head_dim
    attn = 2 * h * q + 2 * h * kv
    if cfg.get("attention_bias", default=False):
        attn += q + 2 * kv + h
    elif model_type == "qwen2":  # Qwen2 always has q/k/v biases
        attn += q + 2 * kv
    mlp = 3 * h * inter + ((2 * inter + h) if cfg.get("mlp_bias", default=False) else 0)
    norms = 2 * h + (2 * head_dim if model_type == "qwen3" else 0)  # Qwen3 also norms q and k per head
    n = vocab * h * (1 if tied else 2) + n_layers * (attn + mlp + norms) + h
    return ModelShape(n, n_layers, h, vocab, heads, kv_heads, inter, head_dim, tied, True, model_type)


def _gpt2(cfg: _Cfg, model_type: str) -> ModelShape:
    h, n_layers, heads = cfg.get("n_embd", "hidden_size"), cfg.get("n_layer"), cfg.get("n_head")
    vocab, positions = cfg.get("vocab_size"), cfg.get("n_positions")
    inner = cfg.get("n_inner", default=4 * h)
    tied = bool(cfg.get("tie_word_embeddings", default=True))
    layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * inner + inner) + (inner * h + h)
    n = vocab * h * (1 if tied else 2) + positions * h + n_layers * layer + 2 * h
    return ModelShape(n, n_layers, h, vocab, heads, heads, inner, 0, tied, False, model_type)


def _opt(cfg: _Cfg, model_type: str) -> ModelShape:
    h, n_layers, heads = cfg.get("hidden_size"), cfg.get("num_hidden_layers"), cfg.get("num_attention_heads")
    vocab, ffn = cfg.get("vocab_size"), cfg.get("ffn_dim")
    proj = cfg.get("word_embed_proj_dim", default=h)
    tied = bool(cfg.get("tie_word_embeddings", default=True))
    bias = bool(cfg.get("enable_bias", default=True))
    ln = 2 * h if cfg.get("layer_norm_elementwise_affine", default=True) else 0
    layer = 4 * (h * h + (h if bias else 0)) + 2 * h * ffn + ((ffn + h) if bias else 0) + 2 * ln
    n = vocab * proj * (1 if tied else 2) + (cfg.get("max_position_embeddings") + 2) * h  # OPT offsets by 2
    n += n_layers * layer + (2 * proj * h if proj != h else 0)  # project_in / project_out
    if cfg.get("do_layer_norm_before", default=True) and not cfg.get(
        "_remove_final_layer_norm", default=False
    ):
        n += ln
    return ModelShape(n, n_layers, h, vocab, heads, heads, ffn, 0, tied, False, model_type)


def _bloom(cfg: _Cfg, model_type: str) -> ModelShape:
    h, n_layers, heads = cfg.get("hidden_size", "n_embed"), cfg.get("n_layer"), cfg.get("n_head")
    vocab = cfg.get("vocab_size")
    tied = bool(cfg.get("tie_word_embeddings", default=True))
    layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h)
    n = vocab * h * (1 if tied else 2) + 2 * h + n_layers * layer + 2 * h  # embedding norm, final norm
    return ModelShape(n, n_layers, h, vocab, heads, heads, 4 * h, 0, tied, False, model_type)


_COUNTERS: dict[str, Callable[[_Cfg, str], ModelShape]] = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "qwen3": _llama_like,
    "gpt2": _gpt2,
    "opt": _opt,
    "bloom": _bloom,
}


def load_shape(model: str, vocab_size: int = 49152) -> ModelShape:
    """A shape for what the CLI names: a preset (`tiny`, `111m`, ...), `default`, a model dir or a
    `config.json`. `vocab_size` applies to presets only. Nothing is downloaded."""
    from chatforge.plan.scaling import PRESETS, preset_config

    if model in PRESETS:
        return ModelShape.from_hf_config(preset_config(model, vocab_size))
    if model == "default":
        return ModelShape.from_hf_config(DEFAULT_MODEL_CONFIG)
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        from chatforge.errors import ConfigError

        hint = " (hub ids are not fetched: download the model, then pass its dir)" if "/" in model else ""
        raise ConfigError(
            f"{model}: not a preset ({', '.join(PRESETS)}), 'default', a model dir or config.json{hint}"
        )
    return ModelShape.from_hf_config(json.loads(path.read_text()))
