"""Load a trained reward model (`chatforge rm` output) and score (prompt, response) pairs with it.

    >>> from chatforge.reward import load_reward_model, score_texts   # doctest: +SKIP
    >>> model, tok, meta = load_reward_model("runs/rm/final")        # doctest: +SKIP
    >>> score_texts(model, tok, ["2+3?", "2+3?"], ["5", "6"])         # doctest: +SKIP
    [1.93, -2.41]

Scores are the raw head outputs (not normalised); `meta["reward_mean"]` and `meta["reward_std"]`
are the statistics saved at training time, for callers that normalise. Each pair is tokenised
exactly as in training (`templates.tokenize_prompt_response`): a prompt is a string (one user turn)
or a list of chat messages; a response is a string (one assistant turn) or a list of messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def load_reward_model(path: str | Path, device=None, dtype=None):
    """(ScalarHeadModel in eval mode, tokenizer, meta from score_head.json) from a reward model dir.

    A LoRA reward model is its base (from adapter_config.json) plus the adapter; a full model dir
    loads directly. `dtype` defaults to float32, `device` to the best available.
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
    import torch

    from chatforge.data.collate import pad_batch
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
    device = next(model.parameters()).device
    scores: list[float] = []
    model.eval()
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            batch = pad_batch(rows[s : s + batch_size], pad_id=tokenizer.pad_token_id)
            out = model.score(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            scores += out.float().cpu().tolist()
    return scores
