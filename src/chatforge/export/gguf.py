"""Write a causal LM as one GGUF file for llama.cpp (and Ollama, through a Modelfile beside it).

    chatforge export-gguf MODEL OUT.gguf [--type f16|bf16|q8_0]

MODEL is a full model dir (a merged model, a full fine-tune's final/) or a LoRA adapter dir (a
LoRA run's final/), which is folded into its base in memory. Supported architectures: the
LLaMA family (llama: LLaMA 2/3 shapes, SmolLM, SmolLM2) and Qwen2 (Qwen2, Qwen2.5), with a
byte-level BPE tokenizer (see chatforge.export.vocab).

Written with the `gguf` package's GGUFWriter rather than by llama.cpp's convert_hf_to_gguf.py:
that script is not on PyPI by itself (only inside the llama-cpp-python sdist), must match
the gguf package's version, and identifies a BPE tokenizer by hashing how it encodes a probe text,
so a fine-tuned or custom tokenizer it has never seen is refused. Here the pre-tokenizer is read
from tokenizer.json. The layout follows the converter: LLaMA's q/k rows are permuted into
llama.cpp's rotary order (transformers' GGUF reader undoes it), 1-D tensors stay f32, a tied
output head is not written twice. q8_0 is computed in numpy by the gguf package; K-quants need
llama.cpp's own `llama-quantize`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from chatforge.errors import ChatforgeError

TYPES = ("f16", "bf16", "q8_0")


@dataclass(frozen=True)
class Arch:
    """How one transformers model_type maps onto a llama.cpp architecture."""

    gguf_name: str  # gguf.MODEL_ARCH member name
    permute_qk: bool  # LLaMA's rotary layout differs between transformers and llama.cpp


ARCHS = {"llama": Arch("LLAMA", permute_qk=True), "qwen2": Arch("QWEN2", permute_qk=False)}


def permute_for_rope(w, n_heads: int):
    """Rows of a q/k projection [n_heads * head_dim, in] from transformers' rotary layout (the two
    halves of each head rotated together) to llama.cpp's (interleaved pairs)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_theta(config) -> float:
    """RoPE base frequency: transformers 5 keeps it in `rope_parameters`; refuse scaled RoPE."""
    rope = getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise ChatforgeError(f"config.json: RoPE scaling {kind!r} is not supported by export-gguf")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ChatforgeError("config.json: no rope_theta")
    return float(theta)


def check_supported(config) -> Arch:
    kind = getattr(config, "model_type", "?")
    if kind not in ARCHS:
        raise ChatforgeError(
            f"config.json: model_type {kind!r} is not supported by export-gguf (supported: {', '.join(ARCHS)})"
        )
    if kind == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise ChatforgeError("config.json: a LLaMA model with attention or MLP biases is not supported")
    if getattr(config, "use_sliding_window", False):
        raise ChatforgeError("config.json: sliding-window attention is not supported by export-gguf")
    return ARCHS[kind]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def gguf_tensors(state: dict, config, arch: Arch):
    """Yield (gguf name, float32 numpy array) for each weight of a transformers `state_dict`."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_name], config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ChatforgeError(f"weights: no GGUF name for tensor {name!r}")
        w = tensor.detach().float().cpu().numpy()
        if arch.permute_qk and name.endswith("q_proj.weight"):
            w = permute_for_rope(w, config.num_attention_heads)
        elif arch.permute_qk and name.endswith("k_proj.weight"):
            w = permute_for_rope(w, config.num_key_value_heads)
        yield new, w


def encode(w, kind: str):
    """(data, GGMLQuantizationType) for one tensor: 1-D tensors in f32; q8_0 needs rows that are
    a multiple of 32 values, else that tensor stays f16."""
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if w.ndim == 1:
        return w.astype(np.float32), Q.F32
    if kind == "f16" or (kind == "q8_0" and w.shape[-1] % 32):
        return w.astype(np.float16), Q.F16
    qtype = Q.BF16 if kind == "bf16" else Q.Q8_0
    return gguf.quants.quantize(w, qtype), qtype


def load_source(path: str | Path):
    """(model, tokenizer) in fp32 on CPU: a full model dir, or a LoRA adapter dir merged into its base."""
    import torch

    from chatforge.models.adapters import is_adapter_dir, load_adapter_model
    from chatforge.models.load import load_model, load_tokenizer

    p = Path(path)
    if not p.is_dir():
        raise ChatforgeError(f"{p}: no such model dir")
    cpu = torch.device("cpu")
    if is_adapter_dir(p):
        peft_model = load_adapter_model(p, dtype=torch.float32, device=cpu)
        if peft_model.peft_config["default"].peft_type.value != "LORA":
            raise ChatforgeError(f"{p}: only LoRA adapters can be merged (prefix/prompt tuning cannot)")
        model = peft_model.merge_and_unload()
    elif (p / "config.json").is_file():
        model = load_model(str(p), dtype=torch.float32, device=cpu)
    else:
        raise ChatforgeError(
            f"{p}: neither a model dir (config.json) nor an adapter dir (adapter_config.json)"
        )
    return model.eval(), load_tokenizer(str(p))


def write_gguf(model, tokenizer, out: Path, kind: str) -> Path:
    """Write `model` and `tokenizer` to `out` as GGUF with 2-D weights in `kind` (atomically)."""
    import gguf

    from chatforge.export.vocab import gguf_vocab

    config = model.config
    arch = check_supported(config)
    vocab = gguf_vocab(tokenizer, config.vocab_size)
    theta = rope_theta(config)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_name]])
    try:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(out.stem)
        w.add_file_type(
            {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16}.get(
                kind, gguf.LlamaFileType.MOSTLY_Q8_0
            )
        )
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_rope_dimension_count(head_dim(config))
        w.add_rope_freq_base(theta)
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_vocab_size(config.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        w.add_token_merges(vocab.merges)
        for token, add in (
            (tokenizer.bos_token_id, w.add_bos_token_id),
            (tokenizer.eos_token_id, w.add_eos_token_id),
            (tokenizer.pad_token_id, w.add_pad_token_id),
        ):
            if token is not None:
                add(token)
        w.add_add_bos_token(False)  # chatforge's templates and tokenizers write no BOS of their own
        if tokenizer.chat_template:
            w.add_chat_template(tokenizer.chat_template)
        for name, tensor in gguf_tensors(model.state_dict(), config, arch):
            data, qtype = encode(tensor, kind)
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def export_gguf(model_dir: str | Path, out: str | Path, kind: str = "f16") -> tuple[Path, Path]:
    """Export `model_dir` to the GGUF file `out` and an Ollama `Modelfile` beside it; returns both
    paths. Everything is checked (type, architecture, tokenizer, chat template) before writing."""
    from chatforge.export.modelfile import chatml_default_system, modelfile_text, stop_tokens

    if kind not in TYPES:
        raise ChatforgeError(f"--type: unknown type {kind!r} (choose {', '.join(TYPES)})")
    out = Path(out)
    if out.suffix != ".gguf":
        raise ChatforgeError(f"{out}: the output file name must end in .gguf")
    model, tokenizer = load_source(model_dir)
    system = chatml_default_system(tokenizer)
    modelfile = modelfile_text(out.name, system, stop_tokens(tokenizer))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(model, tokenizer, out, kind)
    (out.parent / "Modelfile").write_text(modelfile)
    return out, out.parent / "Modelfile"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="chatforge export-gguf",
        description="Write a model (a model dir, a LoRA adapter dir, or a run's final/) as one GGUF file for "
        "llama.cpp, with an Ollama Modelfile beside it.",
    )
    p.add_argument("model", help="model dir, LoRA adapter dir (merged on the fly), or RUN/final")
    p.add_argument("out", help="the .gguf file to write; the Modelfile goes in the same folder")
    p.add_argument("--type", default="f16", help=f"2-D weight type: {', '.join(TYPES)} (default f16)")
    args = p.parse_args(argv)
    out, modelfile = export_gguf(args.model, args.out, args.type)
    print(f"GGUF written to {out} ({out.stat().st_size / 2**20:.1f} MiB); Ollama Modelfile: {modelfile}")
    return 0
