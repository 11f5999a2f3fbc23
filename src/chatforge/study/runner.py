"""`chatforge scaling study CONFIG`: an IsoFLOP grid of pretraining runs on your text, then the fit.

    chatforge scaling study configs/scaling-stdlib.yaml      run (or resume) the grid, fit, report
    chatforge scaling study CONFIG --dry-run                 print the grid and its cost, run nothing
    chatforge scaling fit RUN_DIR [--predict 1e15 ...]       refit the finished runs of a study

Steps of a study:
1. check the grid (sizes, budgets >= one step per size) before anything is written;
2. train or load the tokenizer, tokenise the corpus once, hold out `eval_fraction` of its blocks;
3. one pretraining run per (budget, size) in OUTPUT/runs/NAME via the pretrain stage's
   `train_on_blocks`. A run with result.json is finished and skipped; one with checkpoints resumes
   (`train.resume=true`); each ends with its held-out loss. `jobs: N` trains N runs at a time in
   worker processes, longest first (chatforge.study.workers);
4. fit approaches 3 and 2 with a bootstrap (chatforge.study.report) -> report.md, scaling.png,
   scaling.json;
5. with `check_budget`, predict one larger run's loss from the fit of the grid runs, write the
   prediction, then read (or train) that run and report both. With `jobs` > 1 and a fixed
   `check_size` the check run trains beside the grid from the start; its result is read only in
   this step, after the prediction is on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from chatforge.study.grid import (
    GridRun,
    StudyConfig,
    load_study,
    nearest_size,
    plan_grid,
    plan_run,
    predict_budgets,
)


def _log(msg: str) -> None:
    print(f"chatforge scaling: {msg}", flush=True)


def study_tokenizer(cfg: StudyConfig, texts_fn):
    """The study's tokenizer: trained on the corpus once and kept in OUTPUT/tokenizer, or loaded."""
    from chatforge.models.load import load_tokenizer

    if cfg.tokenizer != "corpus":
        return load_tokenizer(cfg.tokenizer), cfg.tokenizer
    path = Path(cfg.output_dir) / "tokenizer"
    if not (path / "tokenizer_config.json").is_file():
        from chatforge.models.tiny import corpus_tokenizer

        tok = corpus_tokenizer(texts_fn(), cfg.vocab_size)
        tmp = path.with_name(".tmp-tokenizer")
        tok.save_pretrained(tmp)
        os.replace(tmp, path)
        _log(f"trained a byte-level BPE tokenizer of {len(tok)} tokens on the corpus: {path}")
    return load_tokenizer(str(path)), str(path)


def planned_vocab(cfg: StudyConfig) -> int:
    """The vocabulary the grid is checked with before the tokenizer exists (an upper bound)."""
    if cfg.tokenizer == "corpus":
        return cfg.vocab_size
    from chatforge.models.load import load_tokenizer

    return len(load_tokenizer(cfg.tokenizer))


def run_config(cfg: StudyConfig, run: GridRun, tok_path: str, run_dir: Path, resume: bool):
    """The pretrain stage's config for one run of the study."""
    from chatforge.config import load_config

    return load_config(
        None,
        [
            f"pretrain.preset={run.size}",
            f"pretrain.tokenizer={tok_path}",
            f"data.train=[{','.join(cfg.data)}]",
            f"data.max_length={cfg.seq_len}",
            f"train.output_dir={run_dir}",
            f"train.max_steps={run.steps}",
            f"train.batch_size={cfg.batch_size}",
            f"train.lr={cfg.lr}",
            f"train.warmup_ratio={cfg.warmup_ratio}",
            f"train.seed={cfg.seed}",
            f"train.log_every={max(1, run.steps // 100)}",
            f"train.save_every={max(50, run.steps // 5)}",
            "train.keep_last=1",
            "train.progress=false",
            "train.mixed_precision=none",
            f"train.resume={str(resume).lower()}",
            *cfg.overrides,
        ],
    )


def run_dir(output_dir: str, name: str) -> Path:
    """The folder of the study run `name`."""
    return Path(output_dir) / "runs" / name


def _eval_loss(run_dir: Path) -> float | None:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["eval/loss"] for r in rows if "eval/loss" in r]
    return losses[-1] if losses else None


def run_one(cfg: StudyConfig, run: GridRun, tok, tok_path: str, blocks, held) -> tuple[dict, bool]:
    """(result, trained now): the run's result.json, training or resuming it first when missing."""
    from chatforge.errors import ChatforgeError
    from chatforge.train.common import start_run
    from chatforge.train.pretrain import train_on_blocks

    out = run_dir(cfg.output_dir, run.name)
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text()), False
    resume = any((out / "checkpoints").glob("step-*/state.json"))
    _log(
        f"{'resuming' if resume else 'training'} {run.name}: {run.n_params:,} params x {run.tokens:,} tokens "
        f"= {run.flops:.3g} FLOPs ({run.steps} steps)"
    )
    pcfg = run_config(cfg, run, tok_path, out, resume)
    t0 = time.perf_counter()
    try:
        start_run(pcfg, "pretrain")
        _, last = train_on_blocks(pcfg, tok, blocks, held)
    except ChatforgeError as e:  # the error names the run, whichever process trained it
        raise type(e)(str(e) if str(out) in str(e) else f"{out}: {e}") from None
    loss = last.get("eval/loss", _eval_loss(out))
    if loss is None:
        raise ChatforgeError(f"{out}: finished without a held-out loss; delete the dir to rerun it")
    result = {
        "name": run.name,
        "kind": run.kind,
        "size": run.size,
        "budget": run.budget,
        "n_params": run.n_params,
        "tokens": run.tokens,
        "steps": run.steps,
        "flops": run.flops,
        "epochs": round(run.tokens / max(1, sum(len(b["input_ids"]) for b in blocks)), 3),
        "eval_loss": loss,
        "train_loss": last.get("loss"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, done)
    _log(f"{run.name}: held-out loss {loss:.4f} ({result['seconds']:.0f} s)")
    return result, True


def load_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/result.json"))]


def run_study(cfg: StudyConfig, dry_run: bool = False) -> dict:
    """Run the study `cfg` (steps in the module docstring); returns the analysis it reported."""
    from chatforge.data.dataset import build_text_examples, load_validated
    from chatforge.data.formats import to_text
    from chatforge.errors import ChatforgeError, ConfigError
    from chatforge.study import report, workers
    from chatforge.train.common import split_eval

    # step 1: the grid is checked with an upper bound of the vocabulary before anything is written

    missing = [f for f in cfg.data if not Path(f).exists()]
    if missing:
        raise ConfigError(f"data: {missing[0]}: no such file")
    grid = plan_grid(cfg, planned_vocab(cfg))
    if dry_run:
        for r in grid:
            print(f"{r.name:24} {r.n_params:>12,} params {r.tokens:>14,} tokens {r.steps:>7} steps")
        print(f"{len(grid)} runs, {sum(r.flops for r in grid):.3g} FLOPs in all")
        return {}
    if cfg.threads > 0:
        # tiny models on a shared CPU: a second thread mostly waits for the first (measured 3-6x
        # slower with 2 threads than 1 when other jobs hold the cores)
        import torch

        torch.set_num_threads(cfg.threads)
    # step 2: tokenizer and data, tokenised once for every run
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(cfg.__dict__, indent=1))
    tok, tok_path = study_tokenizer(cfg, lambda: load_validated(cfg.data, to_text))
    blocks, data_report = build_text_examples(cfg.data, tok, cfg.seq_len)
    blocks, held = split_eval(blocks, cfg.eval_fraction, cfg.seed)
    _log(f"data: {data_report.summary()}; {len(held)} blocks held out")
    # step 3: the grid, with the exact vocabulary, `jobs` runs at a time
    grid = plan_grid(cfg, len(tok))
    per_step = cfg.seq_len * cfg.batch_size
    check = None
    if cfg.check_budget and cfg.check_size != "auto":
        check = plan_run(cfg.check_size, cfg.check_budget, len(tok), per_step, "check")
    with workers.executor(cfg, tok, tok_path, blocks, held) as runs:
        # a fixed check run may start now (with jobs > 1 it is the longest job, so first); nothing
        # of it is read before step 5
        runs.submit(grid + ([check] if check else []))
        results = [runs.result(run) for run in grid]
        # step 4: fit and report, from the grid runs only
        analysis = report.analyse(results, predict=predict_budgets(cfg), n_boot=cfg.bootstrap, seed=cfg.seed)
        # step 5: the check run the fit predicts, kept out of the fit
        if cfg.check_budget:
            if check is None:  # check_size: auto, the grid size nearest the fit's N_opt
                pred = analysis["predictions"].get(report.budget_key(cfg.check_budget))
                if pred is None:
                    raise ChatforgeError(
                        "check_size: auto needs a compute-optimal N, and this fit has none; name a size"
                    )
                size = nearest_size(cfg.sizes, len(tok), pred["n_opt"])
                check = plan_run(size, cfg.check_budget, len(tok), per_step, "check")
            beside = cfg.jobs > 1 and cfg.check_size != "auto"
            report.add_check_prediction(
                analysis, check.size, check.n_params, check.tokens, check.budget, beside=beside
            )
            report.write(out, analysis)  # the prediction is on disk before the check run's result is read
            report.add_check_measurement(analysis, runs.result(check))
    report.write(out, analysis)
    _log(f"report: {out / 'report.md'}")
    return analysis


def fit_dir(out: Path, predict: list[float], n_boot: int, seed: int) -> dict:
    """Refit a study's finished runs (check runs stay out of the fit, their prediction is redone)."""
    from chatforge.errors import ChatforgeError
    from chatforge.study import report

    results = load_results(out)
    if not results:
        raise ChatforgeError(
            f"{out}: no finished runs (runs/*/result.json); run chatforge scaling study first"
        )
    grid = [r for r in results if r.get("kind", "grid") == "grid"]
    checks = [r for r in results if r.get("kind") == "check"]
    analysis = report.analyse(
        grid, predict=sorted(set(predict) | {c["budget"] for c in checks}), n_boot=n_boot, seed=seed
    )
    for c in checks:
        report.add_check_prediction(analysis, c["size"], c["n_params"], c["tokens"], c["budget"])
        report.add_check_measurement(analysis, c)
    report.write(out, analysis)
    _log(f"report: {out / 'report.md'}")
    return analysis


def main(argv: list[str]) -> int:
    from chatforge.study.grid import describe

    p = argparse.ArgumentParser(
        prog="chatforge scaling",
        description="Scaling-law study: an IsoFLOP grid of pretraining runs on your text, the fitted "
        "loss law L(N, D) = E + A/N^alpha + B/D^beta, and compute-optimal sizes.",
        epilog="study config keys (YAML):\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("study", help="run (or resume) the grid in CONFIG, then fit and report")
    s.add_argument("config")
    s.add_argument("--dry-run", action="store_true", help="print the grid and its cost, run nothing")
    f = sub.add_parser("fit", help="refit the finished runs in a study's output dir")
    f.add_argument("dir")
    f.add_argument("--predict", type=float, nargs="*", default=None, help="budgets (FLOPs) to size for")
    f.add_argument("--bootstrap", type=int, default=None, help="bootstrap refits (default: the study's)")
    args = p.parse_args(argv)
    if args.action == "study":
        run_study(load_study(args.config), dry_run=args.dry_run)
        return 0
    out = Path(args.dir)
    saved = json.loads((out / "study.json").read_text()) if (out / "study.json").is_file() else {}
    predict = args.predict if args.predict is not None else saved.get("predict", [])
    n_boot = args.bootstrap if args.bootstrap is not None else saved.get("bootstrap", 100)
    fit_dir(out, predict, n_boot, saved.get("seed", 0))
    return 0
