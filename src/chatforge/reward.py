"""Load a trained reward model (`chatforge rm` output) and score (prompt, response) pairs with it.

    >>> from chatforge.reward import load_reward_model, score_texts   # doctest: +SKIP
    >>> model, tok, meta = load_reward_model("runs/rm/final")        # doctest: +SKIP
    >>> score_texts(model, tok, ["2+3?", "2+3?"], ["5", "6"])         # doctest: +SKIP
    [1.93, -2.41]

`score_rendered(model, tok, texts)` scores whole chats already rendered as text: trailing
whitespace is stripped first (`INPUT_RENDERING` says how to render; exports record it).

Scores are the raw head outputs (not normalised); `meta["reward_mean"]` and `meta["reward_std"]`
are the statistics saved at training time, for callers that normalise. Each pair is tokenised
exactly as in training (`templates.tokenize_prompt_response`): a prompt is a string (one user turn)
or a list of chat messages; a response is a string (one assistant turn) or a list of messages.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path


def load_reward_model(path: str | Path, device=None, dtype=None):
    """(ScalarHeadModel in eval mode, tokenizer, meta from score_head.json) from a reward model dir.

    A LoRA reward model is its base (from adapter_config.json) plus the adapter, folded into the base
    weights in memory (scoring only: one matmul per layer instead of three); a full model dir loads
    directly. `dtype` defaults to float32, `device` to the best available.
    """
    import torch

    from chatforge.errors import ChatforgeError
    from chatforge.models.adapters import is_adapter_dir, load_adapter_model
    from chatforge.models.heads import ScalarHeadModel, load_head
    from chatforge.models.load import load_model, load_tokenizer, pick_device

    path = Path(path)
    if not path.is_dir():
        raise ChatforgeError(f"{path}: reward model dir not found")
    head, meta = load_head(path, "score")
    device = device if device is not None else pick_device()
    device = torch.device(device) if isinstance(device, str) else device
    dtype = dtype or torch.float32
    if is_adapter_dir(path):
        lm = load_adapter_model(path, dtype=dtype, device=device)
        if lm.peft_config["default"].peft_type.value == "LORA":
            lm = lm.merge_and_unload()
    else:
        lm = load_model(str(path), dtype=dtype, device=device)
    tok = load_tokenizer(str(path))
    model = ScalarHeadModel(lm, head=head, name="score").to(device).eval()
    return model, tok, meta


def _messages(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def score_texts(
    model,
    tokenizer,
    prompts: Sequence,
    responses: Sequence,
    batch_size: int = 8,
    max_length: int = 4096,
) -> list[float]:
    """Raw reward scores, one per (prompt, response); responses longer than max_length are cut."""

    from chatforge.data.templates import ensure_chat_template, tokenize_prompt_response

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    ensure_chat_template(tokenizer)
    rows = []
    for prompt, response in zip(prompts, responses):
        ids, _, _ = tokenize_prompt_response(
            tokenizer, _messages(prompt, "user"), _messages(response, "assistant"), max_length
        )
        rows.append({"input_ids": ids})
    model.eval()
    return _score_rows(model, tokenizer, rows, batch_size)


INPUT_RENDERING = (
    "render the whole chat (user prompt, assistant reply) with tokenizer.apply_chat_template(messages, "
    "tokenize=False), strip trailing whitespace (the score is read at the last token, which must be "
    "the reply's end-of-turn token, not the newline the template adds after it), then tokenize "
    "without adding special tokens"
)


def render_for_scoring(tokenizer, messages: list[dict]) -> str:
    """A chat as the reward model reads it: the template's text without trailing whitespace
    (see INPUT_RENDERING)."""
    return tokenizer.apply_chat_template(messages, tokenize=False).rstrip()


def score_rendered(model, tokenizer, texts: Sequence[str], batch_size: int = 8) -> list[float]:
    """Raw scores of whole chats already rendered as text (e.g. by `apply_chat_template(...,
    tokenize=False)`). Trailing whitespace is dropped first, so a template's newline after the
    last end-of-turn token does not move the read one token late."""

    rows = [{"input_ids": tokenizer(t.rstrip(), add_special_tokens=False)["input_ids"]} for t in texts]
    return _score_rows(model, tokenizer, rows, batch_size)


def _score_rows(model, tokenizer, rows: list[dict], batch_size: int) -> list[float]:
    """Raw scores of tokenized rows (`{"input_ids": [...]}`), in input order; rows of similar length
    are padded and scored together."""
    import torch

    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # little padding per batch
    scores = [0.0] * len(rows)
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            chunk = order[s : s + batch_size]
            out = _score_batch(model, [rows[i]["input_ids"] for i in chunk], tokenizer.pad_token_id, device)
            for i, value in zip(chunk, out.float().cpu().tolist()):
                scores[i] = value
    return scores


def _score_batch(model, rows: list[list[int]], pad_id: int, device):
    """Scores (b,) of token rows; the head every row shares (a chat template's system prompt) runs
    once and its KV cache is copied to each row (exact: the same attention, up to float rounding)."""
    import torch
    from transformers import DynamicCache

    from chatforge.data.collate import pad_batch, shared_prefix_length
    from chatforge.models.heads import last_token_index
    from chatforge.models.logprobs import split_backbone

    parts = split_backbone(model.lm)
    args = inspect.signature(parts[0].forward).parameters if parts is not None else {}
    shared = shared_prefix_length(rows) if "position_ids" in args else 0
    if not shared:
        batch = pad_batch([{"input_ids": r} for r in rows], pad_id=pad_id)
        return model.score(batch["input_ids"].to(device), batch["attention_mask"].to(device))
    decoder = parts[0]
    cache = DynamicCache()
    kw = {"cache" if "cache" in args else "past_key_values": cache}  # transformers 5.x renamed it
    decoder(input_ids=torch.tensor([rows[0][:shared]], device=device), use_cache=True, **kw)
    cache.batch_repeat_interleave(len(rows))
    rest = pad_batch([{"input_ids": r[shared:]} for r in rows], pad_id=pad_id)  # padded on the right
    mask = rest["attention_mask"].to(device)
    positions = shared + torch.arange(mask.shape[1], device=device).expand_as(mask)
    hidden = decoder(
        input_ids=rest["input_ids"].to(device),
        attention_mask=torch.cat([mask.new_ones(len(rows), shared), mask], 1),
        position_ids=positions,
        use_cache=True,
        **kw,
    ).last_hidden_state
    return model.read(hidden).gather(1, last_token_index(mask)[:, None]).squeeze(1)


def spare_pad_token(tokenizer) -> int:
    """A pad id for a sequence-classification export: the tokenizer's own unless it is an end-of-turn
    token (transformers reads the score at the rightmost token that is not the pad, so a pad equal
    to the token that ends every response would move the read one token back); then the first
    special token that neither stops generation nor appears in a rendered chat."""
    from chatforge.data.templates import ensure_chat_template, stop_token_ids
    from chatforge.errors import ChatforgeError

    ensure_chat_template(tokenizer)
    taken = set(stop_token_ids(tokenizer)) | {tokenizer.eos_token_id}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in taken:
        return tokenizer.pad_token_id
    chat = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    taken |= set(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
    special = sorted(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    for token_id in special + list(tokenizer.all_special_ids):
        if token_id not in taken:
            return token_id
    raise ChatforgeError(
        "no special token is free to pad with (the pad token ends every response); "
        "this tokenizer cannot be exported as a sequence classifier without a new token"
    )


def export_sequence_classifier(model_dir: str | Path, out_dir: str | Path, dtype=None) -> Path:
    """Write a reward model as a transformers `AutoModelForSequenceClassification` dir (num_labels=1).

    The LoRA is folded into the base; `score.weight` is chatforge's head weight. That head's bias
    has no place in transformers' `score` layer (bias-free): it shifts every score by the same
    constant, so preferences are unchanged; `chatforge_reward.json` keeps it and the saved reward
    mean/std shifted to match (normalised scores are identical). Returns the output dir.
    """
    import json

    import torch
    from transformers import AutoModelForSequenceClassification

    from chatforge.errors import ChatforgeError

    model, tok, meta = load_reward_model(model_dir, device="cpu", dtype=dtype or torch.float32)
    lm = model.lm.merge_and_unload() if hasattr(model.lm, "merge_and_unload") else model.lm
    config = lm.config
    config.num_labels = 1
    config.pad_token_id = spare_pad_token(tok)
    tok.pad_token = tok.convert_ids_to_tokens(config.pad_token_id)
    try:
        seq = AutoModelForSequenceClassification.from_config(config, dtype=lm.dtype)
    except ValueError as e:
        raise ChatforgeError(
            f"{config.model_type}: transformers has no sequence-classification class ({e})"
        ) from e
    config.architectures = [type(seq).__name__]
    state = {k: v for k, v in lm.state_dict().items() if k in seq.state_dict()}
    missing = set(seq.state_dict()) - set(state)
    if missing != {"score.weight"}:
        raise ChatforgeError(
            f"{config.model_type}: cannot map the backbone onto {type(seq).__name__} ({sorted(missing)[:3]})"
        )
    with torch.no_grad():
        seq.load_state_dict(state, strict=False)
        seq.score.weight.copy_(model.head.weight.to(seq.score.weight.dtype))
    bias = float(model.head.bias.detach()) if model.head.bias is not None else 0.0
    out = Path(out_dir)
    seq.save_pretrained(out)
    tok.save_pretrained(out)
    shifted = {**meta, "score_bias_dropped": bias, "input_rendering": INPUT_RENDERING}
    for key in ("reward_mean", "chosen_mean", "rejected_mean"):
        if key in meta:
            shifted[key] = meta[key] - bias
    (out / "chatforge_reward.json").write_text(json.dumps(shifted, indent=1))
    (out / "README.md").write_text(
        "---\nlibrary_name: transformers\ntags:\n- chatforge\n- reward-model\n---\n\n"
        "# A chatforge reward model (AutoModelForSequenceClassification, num_labels=1)\n\n"
        f"Input: {INPUT_RENDERING}. The logit is the raw score; chatforge_reward.json holds the "
        "training-time reward mean and std for normalising.\n"
    )
    return out
