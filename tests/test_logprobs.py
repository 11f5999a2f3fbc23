"""Chunked log-probs equal the plain full-logits computation, values and gradients."""

import pytest
import torch

from chatforge.models.logprobs import head_logprobs, token_logprobs
from chatforge.models.tiny import TINY_ARCHITECTURES, tiny_model


def reference_logprobs(lm, ids, attn=None):
    logits = lm(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    return torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None]).squeeze(2)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_token_logprobs_match_full_logits(arch, tokenizer):
    lm = tiny_model(arch, tokenizer).eval()
    ids = torch.randint(5, len(tokenizer), (3, 12))
    attn = torch.ones_like(ids)
    mask = torch.rand(3, 12) > 0.3
    got, ent = token_logprobs(lm, ids, attn, target_mask=mask, chunk_size=7, with_entropy=True)
    want = reference_logprobs(lm, ids, attn) * mask[:, 1:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (ent[mask[:, 1:]] > 0).all() and (ent[~mask[:, 1:]] == 0).all()


@pytest.mark.parametrize("head_trainable", [False, True])
def test_head_logprobs_gradients_match_autograd(head_trainable):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    head.weight.requires_grad_(head_trainable)
    hidden = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    weights = torch.randn(13)  # a per-token loss weight, as advantages are in PPO

    lp, _ = head_logprobs(hidden, head, targets, temperature=0.7, chunk_size=4)
    (lp * weights).sum().backward()
    got_h = hidden.grad.clone()
    got_w = head.weight.grad.clone() if head_trainable else None

    hidden.grad = None
    head.weight.grad = None
    ref = torch.log_softmax(head(hidden) / 0.7, -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(lp, ref)
    (ref * weights).sum().backward()
    torch.testing.assert_close(got_h, hidden.grad)
    if head_trainable:
        torch.testing.assert_close(got_w, head.weight.grad)


def test_logprob_model_scores_the_tempered_distribution(tokenizer):
    """RL sets the sampling temperature on the policy: its log-probs are log softmax(logits / T)."""
    from chatforge.models.logprobs import LogprobModel

    lm = tiny_model("llama", tokenizer).eval()
    ids = torch.randint(5, len(tokenizer), (2, 10))
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[:, :-1].float()
        want = torch.log_softmax(logits / 0.7, -1).gather(2, ids[:, 1:, None]).squeeze(2)
        got, _ = LogprobModel(lm, temperature=0.7)(ids)
        plain, _ = LogprobModel(lm)(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, got, atol=1e-3)


def test_head_matmuls_see_row_counts_in_buckets():
    """The head's last chunk is zero-padded to a multiple of ROW_BUCKET rows (kernels are cached
    per shape, so a free row count would add a set every step), and the log-probs are unchanged."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from chatforge.models.logprobs import ROW_BUCKET

    class MatmulRows(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.mm.default:
                self.rows.append(args[0].shape[0])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(2 * ROW_BUCKET + 5, 8, requires_grad=True)
    targets = torch.randint(0, 50, (hidden.shape[0],))
    with MatmulRows() as seen:
        lp, ent = head_logprobs(hidden, head, targets, chunk_size=2 * ROW_BUCKET, with_entropy=True)
    assert seen.rows and all(r % ROW_BUCKET == 0 for r in seen.rows), seen.rows
    ref = torch.log_softmax(head(hidden), -1)
    torch.testing.assert_close(lp, ref.gather(1, targets[:, None]).squeeze(1))
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1))
