"""GRPO's micro-batches of sampled answers: padding trimmed, a prompt's answers branched into one
row, widths rounded up: the same log-probs (and gradients) as one row per answer."""

import pytest
import torch

from chatforge.train import grpo


def test_micro_batches_trim_padding_without_changing_log_probs(tiny_model_dir):
    from chatforge.models.load import load_model, load_tokenizer
    from chatforge.models.logprobs import LogprobModel
    from chatforge.rl.generate import generate, sequence_inputs

    torch.manual_seed(0)
    tok = load_tokenizer(tiny_model_dir)
    model = LogprobModel(load_model(tiny_model_dir, device=torch.device("cpu")))
    prompts = [tok("What is 2 plus 3?")["input_ids"], tok("hi")["input_ids"]] * 2  # very different lengths
    gen = generate(model.lm, tok, prompts, max_new_tokens=10)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    micro = grpo.micro_batches(gen, adv, 1, torch.device("cpu"))
    ids, mask, pos = sequence_inputs(gen)
    target = torch.cat([torch.zeros_like(gen.prompt_mask), gen.response_mask], 1)
    with torch.no_grad():
        full, _ = model(ids, mask, pos, target)
        full = full[:, -gen.response_ids.shape[1] :]
        trimmed = grpo.sequence_logprobs(model, micro)
    for i, (b, lp) in enumerate(zip(micro, trimmed)):
        width = b["response_mask"].shape[1]
        assert b["input_ids"].shape[1] <= ids.shape[1]
        assert int(b["attention_mask"][:, 0].min()) == 1  # no all-padding column left on the left
        assert torch.equal(b["response_mask"], gen.response_mask[i : i + 1, :width])
        assert torch.allclose(
            lp * b["response_mask"], full[i : i + 1, :width] * b["response_mask"], atol=1e-5
        )
        assert float(b["advantages"]) == float(adv[i])
    assert micro[1]["input_ids"].shape[1] < micro[0]["input_ids"].shape[1]  # the short prompt lost its pads


def test_branched_micro_batches_give_the_log_probs_and_gradients_of_rows(tiny_model_dir):
    """A prompt's answers in one row (the prompt once) = one row per answer, also where a micro-batch
    holds answers to two prompts and a group is split across micro-batches."""
    from peft import LoraConfig, get_peft_model

    from chatforge.models.load import load_model, load_tokenizer
    from chatforge.models.logprobs import LogprobModel
    from chatforge.rl.generate import generate

    torch.manual_seed(0)
    tok = load_tokenizer(tiny_model_dir)
    lm = get_peft_model(load_model(tiny_model_dir, device=torch.device("cpu")), LoraConfig(r=4))
    for p in lm.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    model = LogprobModel(lm)
    prompts = [tok("What is 2 plus 3?")["input_ids"]] * 3 + [tok("hi")["input_ids"]] * 3
    gen = generate(model.lm, tok, prompts, max_new_tokens=10, temperature=1.0)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    rows, branched = (grpo.micro_batches(gen, adv, 4, torch.device("cpu"), b) for b in (False, True))
    assert [b["input_ids"].shape[0] for b in branched] == [2, 1]  # prompt A + prompt B; the rest of B
    assert sum(b["num_tokens"] for b in branched) < sum(b["num_tokens"] for b in rows)
    for r, b in zip(grpo.sequence_logprobs(model, rows), grpo.sequence_logprobs(model, branched)):
        torch.testing.assert_close(b, r, atol=1e-5, rtol=1e-5)
    grads = []
    for micro in (rows, branched):
        model.zero_grad()
        for batch in micro:
            loss, _ = grpo.grpo_loss(model, batch, normalizer=10.0, clip_eps=0.2, beta=0.0)
            loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for g_r, g_b in zip(*grads):
        torch.testing.assert_close(g_b, g_r, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("branched", [False, True])
def test_micro_batches_round_widths_without_changing_log_probs(tiny_model_dir, branched):
    from chatforge.models.load import load_model, load_tokenizer
    from chatforge.models.logprobs import LogprobModel
    from chatforge.rl.generate import generate

    torch.manual_seed(0)
    tok = load_tokenizer(tiny_model_dir)
    model = LogprobModel(load_model(tiny_model_dir, device=torch.device("cpu")))
    prompts = [tok("What is 2 plus 3?")["input_ids"]] * 2 + [tok("hi")["input_ids"]] * 2
    gen = generate(model.lm, tok, prompts, max_new_tokens=10, temperature=1.0)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    tight, padded = (
        grpo.micro_batches(gen, adv, 2, torch.device("cpu"), branched, pad_to_multiple_of=m)
        for m in (None, 8)
    )
    full = gen.prompt_ids.shape[1] + gen.response_ids.shape[1]
    assert any(b["input_ids"].shape[1] % 8 for b in tight)  # else nothing to round
    for t, p in zip(tight, padded):
        w = t["input_ids"].shape[1]
        assert p["input_ids"].shape[1] == (-(-w // 8) * 8 if branched else min(-(-w // 8) * 8, full))
    with torch.no_grad():
        for t, p in zip(grpo.sequence_logprobs(model, tight), grpo.sequence_logprobs(model, padded)):
            torch.testing.assert_close(p[:, : t.shape[1]], t, atol=1e-5, rtol=1e-5)
            assert not p[:, t.shape[1] :].any()
