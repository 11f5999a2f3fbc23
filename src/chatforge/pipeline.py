"""Several stages from one config: `chatforge pipeline configs/quickstart.yaml [key=value ...]`.

    RUN/ (= train.output_dir)
      config.yaml             the exact config of the run
      data/                   built-in task data when pipeline.task is set (sft, preference, rl, eval)
      eval/base.json          held-out answers and accuracy of the starting model
      sft/ rm/ ppo/ ...       one folder per stage: metrics.jsonl, checkpoints/, final/, done
      eval/<stage>.json       the same evaluation after each policy stage
      report.md report.html   written after each stage (chatforge.report)

Each stage's output feeds the next. A LoRA SFT adapter is merged into `RUN/sft/merged` (a plain
model dir): later stages start from it, so their LoRA sits on the SFT weights and "adapter disabled"
is exactly the SFT model, the reference PPO/DPO/GRPO need, with one frozen base in memory; a reward
model trained as a LoRA of the same merged base can share that base in PPO. The reward model's
`final/` becomes `ppo.reward_model`.

A stage is finished when `RUN/<stage>/done` exists (written after its `final/`): a re-run skips it.
A stage folder without `done` was interrupted: the stage runs again with `train.resume=true` and
continues from its newest checkpoint. Per-stage overrides (`pipeline.overrides: {ppo: {train.lr:
1e-5}}`) apply on top of the shared sections.

`pipeline.sft_same_time: true` adds the baseline RL has to beat: after the last stage, the SFT model
trains on with SFT (its own settings and `pipeline.overrides.sft`, a fresh adapter and schedule) for
as many steps as make a stage of the wall time the stages after SFT took, at the SFT stage's pace
(its median seconds per step, its fixed cost of loading and saving paid once more); it lands in
`RUN/sft_same_time/` and is evaluated as `eval/sft_same_time.json`, the last row of the report
("SFT only, same total training time"), compared there with the model before it.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path

from chatforge import tracking
from chatforge.config import Config, build_config, save_config, to_flat
from chatforge.errors import ConfigError

# stage -> (entry point, which task file it trains on, whether it trains the policy)
STAGES = {
    "pretrain": ("chatforge.train.pretrain:run", None, True),
    "sft": ("chatforge.train.sft:run", "sft", True),
    "rm": ("chatforge.train.reward:run", "preference", False),
    "dpo": ("chatforge.train.dpo:run", "preference", True),
    "ppo": ("chatforge.train.ppo:run", "rl", True),
    "grpo": ("chatforge.train.grpo:run", "rl", True),
}


def log(msg: str) -> None:
    print(f"chatforge pipeline: {msg}", flush=True)


def check(cfg: Config) -> None:
    import importlib.util

    p = cfg.pipeline
    if not p.stages:
        raise ConfigError("pipeline.stages is empty: list the stages, e.g. [sft, rm, ppo]")
    for stage in [*p.stages, *p.overrides]:
        if stage not in STAGES:
            raise ConfigError(f"pipeline: unknown stage '{stage}' (known: {', '.join(STAGES)})")
    for stage in p.stages:
        if importlib.util.find_spec(STAGES[stage][0].split(":")[0]) is None:
            raise ConfigError(f"pipeline: stage '{stage}' is not available in this chatforge install")
    tracking.check(cfg.train.report_to)  # before evaluating the base model, not at the first stage
    if len(set(p.stages)) != len(p.stages):
        raise ConfigError("pipeline.stages lists a stage twice")
    if "ppo" in p.stages and "rm" in p.stages and p.stages.index("rm") > p.stages.index("ppo"):
        raise ConfigError("pipeline.stages: rm must come before ppo (PPO needs its reward model)")
    for stage, body in p.overrides.items():
        if not isinstance(body, dict):
            raise ConfigError(f"pipeline.overrides.{stage} must be a mapping of dotted keys to values")
        for key in body:
            if str(key).startswith("pipeline."):
                raise ConfigError(f"pipeline.overrides.{stage}: {key} cannot be set per stage")
    build_config({**to_flat(cfg), **{k: v for b in p.overrides.values() for k, v in b.items()}})
    if p.sft_same_time and ("sft" not in p.stages or p.stages[-1] == "sft"):
        raise ConfigError(
            "pipeline.sft_same_time needs an sft stage with stages after it, e.g. [sft, rm, ppo]"
        )
    if "ppo" in p.stages:  # an estimator that cannot run fails now, not after SFT and the reward model
        from chatforge.rl.build import check_estimator

        check_estimator(build_config({**to_flat(cfg), **p.overrides.get("ppo", {})}).ppo)


# ---- data ----------------------------------------------------------------------------------------
def write_data(cfg: Config, run: Path) -> dict[str, Path]:
    """The built-in task files in RUN/data (written once), plus held-out preference pairs."""
    from chatforge.data.answers import verify
    from chatforge.data.tasks import generate, write_task_data

    out = run / "data"
    names = ("sft", "preference", "rl", "eval", "preference_eval")
    paths = {n: out / f"{n}.jsonl" for n in names}
    if all(p.is_file() for p in paths.values()):
        return paths
    p = cfg.pipeline
    slips = f", {p.task_slips:.0%} of demonstrations slipped" if p.task_slips else ""
    log(f"writing built-in task data '{p.task}' (seed {p.task_seed}, demos {p.task_demos}{slips}) to {out}")
    sizes = dict(p.task_sizes)
    n = int(sizes.pop("preference_eval", sizes.get("eval", 200)))
    write_task_data(
        p.task, out, seed=p.task_seed, sizes=sizes or None, demos=p.task_demos, slips=p.task_slips
    )
    # Reward-model accuracy is measured on pairs from the eval split, which training never sees.
    rng = random.Random(f"chatforge.pipeline/{p.task}/{p.task_seed}/preference_eval")
    with open(paths["preference_eval"], "w") as f:
        for _ in range(n):
            prob = generate(p.task, rng, "eval")
            wrong = [w for w in prob.wrong if not verify(prob.task, w, prob.answer)]
            rec = {"prompt": prob.prompt, "chosen": prob.answer, "rejected": rng.choice(wrong)}
            f.write(json.dumps(rec) + "\n")
    return paths


# ---- stages --------------------------------------------------------------------------------------
def stage_config(
    cfg: Config,
    stage: str,
    run: Path,
    model: str,
    data: dict,
    rm: str | None,
    folder: str = "",
    extra: dict | None = None,
) -> Config:
    """The config one stage runs with: shared sections, what earlier stages produced, overrides
    (then `extra`); it writes to RUN/<folder> (default RUN/<stage>)."""
    values = to_flat(cfg)
    stage_dir = run / (folder or stage)
    values["train.output_dir"] = str(stage_dir)
    values["model.path"] = model
    kind = STAGES[stage][1]
    if data and kind:
        values["data.train"] = [str(data[kind])]
        values["data.eval"] = [str(data["preference_eval"])] if stage == "rm" else []
    if stage == "ppo" and rm:
        values["ppo.reward_model"] = rm
    values.update(cfg.pipeline.overrides.get(stage, {}))
    values.update(extra or {})
    # A folder without `done` is an interrupted stage: continue from its newest checkpoint.
    values["train.resume"] = stage_dir.is_dir() or bool(values.get("train.resume"))
    if stage_dir.is_dir() and not any((stage_dir / "checkpoints").glob("step-*")):
        (stage_dir / "metrics.jsonl").unlink(missing_ok=True)  # nothing to resume: start clean
    return build_config(values)


def reset_peak_memory() -> str:
    """Start a per-stage peak-memory window; returns what `peak_memory` will measure."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # Linux: writing 5 to clear_refs resets VmHWM, the peak resident set size
        Path("/proc/self/clear_refs").write_text("5")
        return "peak resident memory (VmHWM) of the process during the stage"
    except OSError:
        return "peak resident memory (ru_maxrss) of the process since it started"


def peak_memory() -> dict:
    import resource

    import torch

    out = {}
    try:
        status = Path("/proc/self/status").read_text()
        kb = int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM")).split()[1])
    except (OSError, StopIteration, ValueError):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out["peak_rss_gib"] = round(kb / 2**20, 3)
    if torch.cuda.is_available():
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def run_stage(stage: str, scfg: Config) -> dict:
    """Run one stage; returns its stats (final dir, wall time, peak memory)."""
    from chatforge.cli import _load

    measured = reset_peak_memory()
    t0 = time.perf_counter()
    final = _load(STAGES[stage][0])(scfg)
    stats = {"final": str(final), "wall_s": round(time.perf_counter() - t0, 1), "memory": measured}
    stats.update(peak_memory())
    stats["resumed"] = bool(scfg.train.resume)
    return stats


def policy_dir(stage_dir: Path, final: str, needed: bool) -> str:
    """The model dir later stages start from: LoRA adapters merged into `stage_dir/merged`."""
    from chatforge.models.adapters import is_adapter_dir, merge_adapter

    if not needed or not is_adapter_dir(final):
        return final
    cfg = json.loads((Path(final) / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{final}: only a LoRA stage can feed a later stage (merge needs LoRA)")
    merged = stage_dir / "merged"
    if not (merged / "config.json").is_file():
        log(f"merging the adapter into {merged}")
        tmp = stage_dir / ".tmp-merged"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        merge_adapter(final, tmp)
        tmp.rename(merged)
    return str(merged)


SAME_TIME = "sft_same_time"


def continuation_steps(extra_s: float, sft_wall_s: float, sft_steps: int, step_s: float = 0.0) -> int:
    """SFT steps that make a stage of `extra_s` seconds at the SFT stage's pace.

    With `step_s` (the SFT stage's median wall seconds per step) the stage's fixed cost (loading,
    saving, merging: its wall time less its steps) is paid once more and the rest goes to steps;
    without it, the stage's wall time per step, fixed cost included (fewer steps).

    >>> continuation_steps(300.0, 100.0, 20)
    60
    >>> continuation_steps(300.0, 100.0, 20, step_s=4.0)  # 20 s fixed, then 280 s of 4 s steps
    70
    """
    if step_s > 0:
        fixed = max(sft_wall_s - step_s * sft_steps, 0.0)
        return max(1, round((extra_s - fixed) / step_s))
    return max(1, round(extra_s * max(sft_steps, 1) / max(sft_wall_s, 1e-9)))


def run_sft_same_time(cfg: Config, run: Path, data: dict) -> dict:
    """`pipeline.sft_same_time`: the SFT model trained on with SFT for the wall time of the stages
    after SFT; returns its stats (those of `run_stage` + the time it was given and its steps)."""
    from chatforge.report import read_metrics

    p = cfg.pipeline
    done = run / SAME_TIME / "done"
    if done.is_file():
        return json.loads(done.read_text())
    sft = json.loads((run / "sft" / "done").read_text())
    later = p.stages[p.stages.index("sft") + 1 :]
    extra_s = sum(json.loads((run / s / "done").read_text())["wall_s"] for s in later)
    records = [r for r in read_metrics(run / "sft" / "metrics.jsonl") if "eval/loss" not in r]
    sft_steps = max((r.get("step", 0) for r in records), default=0)
    paces = [r["step_s"] for r in records if "step_s" in r]
    step_s = statistics.median(paces) if paces else 0.0  # the median: the first step warms up
    steps = continuation_steps(extra_s, sft["wall_s"], sft_steps, step_s)
    pace = step_s or sft["wall_s"] / max(sft_steps, 1)
    start = sft.get("model", sft["final"])
    log(
        f"{SAME_TIME}: SFT on from {start} for {steps} steps, the {extra_s:.0f} s that "
        f"{', '.join(later)} took at SFT's {pace:.2f} s per step"
    )
    scfg = stage_config(
        cfg, "sft", run, start, data, None, folder=SAME_TIME, extra={"train.max_steps": steps}
    )
    stats = run_stage("sft", scfg)
    stats.update(target_s=round(extra_s, 1), steps=steps, start=start, after=later)
    done.write_text(json.dumps(stats, indent=1))
    log(f"{SAME_TIME}: done in {stats['wall_s']:.0f} s (target {extra_s:.0f} s)")
    return stats


# ---- evaluation ----------------------------------------------------------------------------------
def evaluate_policy(cfg: Config, run: Path, label: str, model: str, eval_data: str | None) -> None:
    """Greedy answers and exact accuracy of `model`, kept in RUN/eval/<label>.json."""
    from chatforge.evaluate import accuracy, generate_answers, load_inference_model, read_items

    out = run / "eval" / f"{label}.json"
    if out.is_file() or not eval_data:
        return
    p = cfg.pipeline
    items = read_items(eval_data)[: p.eval_limit or None]
    log(f"evaluating {label} ({model}) on {len(items)} held-out items")
    t0 = time.perf_counter()
    lm, tok = load_inference_model(model, cfg.model.dtype)
    convs = [it["messages"] for it in items]
    responses, tps = generate_answers(
        lm, tok, convs, p.eval_max_new_tokens, p.eval_batch_size, cfg.train.progress
    )
    exact = accuracy(items, responses)
    result = {"label": label, "model": model, "data": eval_data, "responses": responses, "exact": exact}
    result.update(generate_tokens_per_s=round(tps, 1), wall_s=round(time.perf_counter() - t0, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    log(f"{label}: accuracy {exact['accuracy']:.3f} ± {exact['stderr']:.3f} (n={exact['n']})")


def score_with_rm(run: Path, rm: str, eval_data: str | None, pairs: Path | None, batch: int) -> None:
    """Reward-model scores of every saved eval answer, and RM pair accuracy on held-out pairs."""
    from chatforge.evaluate import read_items, reward_scores

    rm_file = run / "eval" / "rm.json"
    meta_file = Path(rm) / "score_head.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if not rm_file.is_file() and meta.get("stats_on") == "eval" and "eval_accuracy" in meta:
        # The rm stage already scored the held-out pairs (its data.eval): no second pass.
        acc, n = meta["eval_accuracy"], meta.get("pairs", 0)
        rm_file.parent.mkdir(parents=True, exist_ok=True)
        rm_file.write_text(json.dumps({"model": rm, "pair_accuracy": acc, "n": n}, indent=1))
        log(f"reward model: held-out pair accuracy {acc:.3f} (n={n})")
    if pairs is not None and pairs.is_file() and not rm_file.is_file():
        from chatforge.data.dataset import load_validated
        from chatforge.data.formats import to_preference

        recs = load_validated(pairs, to_preference)
        convs = [r.prompt for r in recs]
        chosen = reward_scores(rm, convs, [r.chosen[-1]["content"] for r in recs], batch)
        rejected = reward_scores(rm, convs, [r.rejected[-1]["content"] for r in recs], batch)
        acc = sum(c > r for c, r in zip(chosen, rejected)) / len(recs)
        rm_file.parent.mkdir(parents=True, exist_ok=True)
        rm_file.write_text(json.dumps({"model": rm, "pair_accuracy": acc, "n": len(recs)}, indent=1))
        log(f"reward model: held-out pair accuracy {acc:.3f} (n={len(recs)})")
    if not eval_data:
        return
    convs = [it["messages"] for it in read_items(eval_data)]
    loaded = None  # the reward model, loaded once for every file that needs scores
    for path in sorted((run / "eval").glob("*.json")):
        result = json.loads(path.read_text())
        if "responses" not in result or result.get("reward", {}).get("model") == rm:
            continue
        if loaded is None:
            from chatforge.reward import load_reward_model

            loaded = load_reward_model(rm)[:2]
        scores = reward_scores(loaded, convs[: len(result["responses"])], result["responses"], batch)
        result["reward"] = {"model": rm, "mean": sum(scores) / len(scores), "scores": scores}
        path.write_text(json.dumps(result, indent=1))


# ---- the run -------------------------------------------------------------------------------------
def run(cfg: Config) -> str:
    """Run every stage of `cfg.pipeline.stages` in order; returns the report path."""
    from chatforge.report import write_report

    check(cfg)
    # absolute, so the adapter configs the stages write (base_model_name_or_path) load from any cwd
    run_dir = Path(cfg.train.output_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    p = cfg.pipeline
    data = write_data(cfg, run_dir) if p.task else {}
    eval_data = p.eval_data or (str(data["eval"]) if data else None)
    pairs = data.get("preference_eval")
    model, rm = cfg.model.path, None
    if p.eval_base:
        evaluate_policy(cfg, run_dir, "base", model, eval_data)
    for i, stage in enumerate(p.stages):
        stage_dir = run_dir / stage
        done = stage_dir / "done"
        feeds_later = any(STAGES[s][2] or s == "rm" for s in p.stages[i + 1 :])
        if done.is_file():
            stats = json.loads(done.read_text())
            log(f"{stage}: finished earlier, skipped ({stats['final']})")
            if STAGES[stage][2] and feeds_later and stats.get("model", stats["final"]) == stats["final"]:
                # It was the last stage then; now a later stage needs it as a plain model dir.
                stats["model"] = policy_dir(stage_dir, stats["final"], True)
                done.write_text(json.dumps(stats, indent=1))
        else:
            scfg = stage_config(cfg, stage, run_dir, model, data, rm)
            verb = "resuming" if scfg.train.resume else "running"
            log(f"stage {i + 1}/{len(p.stages)}: {verb} {stage} in {stage_dir}")
            stats = run_stage(stage, scfg)
            if STAGES[stage][2]:
                stats["model"] = policy_dir(stage_dir, stats["final"], feeds_later)
            done.write_text(json.dumps(stats, indent=1))
            log(f"{stage}: done in {stats['wall_s']:.0f} s, peak {stats['peak_rss_gib']:.2f} GiB")
        if STAGES[stage][2]:
            model = stats.get("model", stats["final"])
            evaluate_policy(cfg, run_dir, stage, model, eval_data)
        else:
            rm = stats["final"]
        if rm:
            score_with_rm(run_dir, rm, eval_data, pairs, p.eval_batch_size)
        write_report(run_dir)
    if p.sft_same_time:
        stats = run_sft_same_time(cfg, run_dir, data)
        evaluate_policy(cfg, run_dir, SAME_TIME, stats["final"], eval_data)
        if rm:
            score_with_rm(run_dir, rm, eval_data, pairs, p.eval_batch_size)
    report = write_report(run_dir)
    log(f"report: {report} (and {report.with_suffix('.html')})")
    return str(report)
