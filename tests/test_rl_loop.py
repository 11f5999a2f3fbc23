"""The shared RL outer loop (train/rl_loop.py): each process's prompts and sampler seeds are its
slice of the one-process global batch, so PPO and GRPO sample alike on 1 or 2 processes."""

import pytest

from chatforge.train.rl_loop import step_prompts, total_steps


@pytest.mark.parametrize("answers", [1, 3])
def test_processes_split_the_global_batch_and_its_seeds(answers):
    items = list(range(10))
    for step in range(4):
        whole, seeds = step_prompts(items, step, 4, answers, rank=0, world=1, seed=7, per_row=True)
        parts = [step_prompts(items, step, 2, answers, rank=r, world=2, seed=7, per_row=True) for r in (0, 1)]
        assert parts[0][0] + parts[1][0] == whole and parts[0][1] + parts[1][1] == seeds
        assert len(set(seeds)) == len(seeds) == 4 * answers  # every answer its own draws
        # the answers to one prompt are adjacent
        assert all(len(set(whole[i : i + answers])) == 1 for i in range(0, len(whole), answers))
    assert step_prompts(items, 0, 4, 2, 0, 1, 7, per_row=False)[1] is None


def test_steps_count_rl_steps_over_the_global_batch():
    from types import SimpleNamespace

    tcfg = SimpleNamespace(max_steps=0, epochs=1.5)
    assert total_steps(tcfg, 17, 4) == 6  # 4 steps per pass (the partial batch is dropped) x 1.5
    assert total_steps(tcfg, 17, 4, world=2) == 3
