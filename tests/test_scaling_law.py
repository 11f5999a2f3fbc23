"""The loss law: fits recover known constants, approaches 2 and 3 agree, the published fit's optimum,
the training+serving trade-off, the WIDTHxDEPTH dial, and `chatforge plan --budget/--target-loss`."""

from __future__ import annotations

import json
import math
import random

import pytest

from chatforge.errors import ConfigError
from chatforge.plan.fit import Point, bootstrap, fit_frontier, fit_law, isoflop_minima, spread
from chatforge.plan.law import (
    CHINCHILLA,
    Law,
    compare,
    compute_optimal,
    load_law,
    tokens_for_loss,
    train_serve_optimal,
)

TRUE = Law(1.9, 300.0, 600.0, 0.32, 0.36)  # not a grid point of the fit's initialisations


def isoflop_points(law: Law, noise: float, seed: int = 0) -> list[Point]:
    """9 sizes per budget, spaced a quarter-decade apart around the law's optimum, loss x lognormal noise."""
    rng = random.Random(seed)
    points = []
    for c in (1e17, 1e18, 1e19, 1e20):
        n_opt, _ = compute_optimal(law, c)
        for k in range(-4, 5):
            n = n_opt * 10 ** (k / 4)
            d = c / (6 * n)
            points.append(Point(n, d, law.loss(n, d) * math.exp(rng.gauss(0, noise)), c))
    return points


@pytest.fixture(scope="module")
def noisy():
    points = isoflop_points(TRUE, noise=0.005)
    return points, fit_law(points)


def test_approach_3_recovers_known_constants_from_noisy_losses(noisy):
    points, fit = noisy
    # 36 runs, 0.5% noise on each loss: exponents within 0.03, E within 3%, A and B within 25%
    assert fit.alpha == pytest.approx(TRUE.alpha, abs=0.03)
    assert fit.beta == pytest.approx(TRUE.beta, abs=0.03)
    assert abs(fit.E / TRUE.E - 1) < 0.03
    assert abs(fit.A / TRUE.A - 1) < 0.25 and abs(fit.B / TRUE.B - 1) < 0.25
    assert fit.a == pytest.approx(TRUE.a, abs=0.02)
    # and it predicts 10x beyond the largest budget within 1%
    n, d = compute_optimal(TRUE, 1e21)
    assert fit.loss(n, d) == pytest.approx(TRUE.loss(n, d), rel=0.01)
    # noise-free losses come back almost exactly
    exact = fit_law(isoflop_points(TRUE, noise=0.0), top_k=2)
    assert (exact.alpha, exact.beta, exact.E) == pytest.approx((TRUE.alpha, TRUE.beta, TRUE.E), rel=1e-3)


def test_approach_2_exponent_matches_approach_3_implied_a(noisy):
    points, fit = noisy
    minima = isoflop_minima(points)
    assert len(minima) == 4 and all(m.bracketed for m in minima)
    front = fit_frontier(minima)
    assert front.a == pytest.approx(fit.a, abs=0.02)
    assert front.b == pytest.approx(fit.b, abs=0.02)
    assert front.a == pytest.approx(TRUE.a, abs=0.02)  # a = beta / (alpha + beta) = 0.529
    # its N_opt at a budget tracks the law's within 15%
    assert front.n_opt(1e19) == pytest.approx(compute_optimal(TRUE, 1e19)[0], rel=0.15)


def test_isoflop_without_a_minimum_and_too_few_budgets():
    law = Law(1.9, 300.0, 600.0, 0.32, 0.36)
    # a concave "curve": loss falls faster than a parabola can bend up
    pts = [Point(n, 1e9, 3.0 - 0.1 * math.log(n) ** 2 / 100, 1e18) for n in (1e6, 1e7, 1e8)]
    (m,) = isoflop_minima(pts)
    assert math.isnan(m.n_opt) and not m.bracketed
    with pytest.raises(ValueError, match="bracketed IsoFLOP minima at 2 or more budgets"):
        fit_frontier(isoflop_minima(isoflop_points(law, 0.0)[:9]))


def test_bootstrap_spreads_around_the_fit(noisy):
    points, fit = noisy
    boots = bootstrap(points, n_boot=4, seed=1, start=fit, top_k=1)
    assert len(boots) == 4 and all(f is not None for _, f in boots)
    s = spread([law.alpha for law, _ in boots])
    assert s["n"] == 4 and s["p5"] <= s["p50"] <= s["p95"] and s["std"] > 0
    assert abs(s["p50"] - fit.alpha) < 0.05
    assert spread([math.nan])["n"] == 0


def test_published_chinchilla_fit():
    assert CHINCHILLA.a == pytest.approx(0.45, abs=0.01)
    assert CHINCHILLA.b == pytest.approx(0.55, abs=0.01)
    n, d = compute_optimal(CHINCHILLA, 1e21)
    assert 6 * n * d == pytest.approx(1e21)
    assert 10 <= d / n <= 100  # tens of tokens per parameter (50 for this fit)
    # the closed form is the minimum: nearby sizes at the same budget do worse
    for f in (0.8, 1.25):
        assert CHINCHILLA.loss(n * f, d / f) > CHINCHILLA.loss(n, d)
    assert tokens_for_loss(CHINCHILLA, 1e3, 2.0) == math.inf


def test_serving_more_tokens_gives_smaller_models_trained_longer():
    target = CHINCHILLA.loss(*compute_optimal(CHINCHILLA, 1e21))
    plans = [train_serve_optimal(CHINCHILLA, target, s) for s in (0, 1e10, 1e11, 1e12, 1e13)]
    n0, _ = compute_optimal(CHINCHILLA, 1e21)
    assert plans[0].n == pytest.approx(n0, rel=1e-3)  # no serving: the Chinchilla-optimal model
    for p in plans:
        assert p.loss == pytest.approx(target, rel=1e-9)
    ns = [p.n for p in plans]
    tpp = [p.tokens_per_param for p in plans]
    assert all(a > b for a, b in zip(ns, ns[1:])), ns
    assert all(a < b for a, b in zip(tpp, tpp[1:])), tpp
    _, chin, best = compare(CHINCHILLA, budget=1e21, serve_tokens=1e12)
    assert best.total_flops < chin.total_flops and chin.n == pytest.approx(n0)
    # serving for free: training cost alone decides; costly serving: smaller still
    free = train_serve_optimal(CHINCHILLA, target, 1e12, serve_cost=0.0)
    dear = train_serve_optimal(CHINCHILLA, target, 1e12, serve_cost=10.0)
    assert free.n == pytest.approx(n0, rel=1e-3) and dear.n < plans[3].n
    with pytest.raises(ValueError, match="irreducible"):
        train_serve_optimal(CHINCHILLA, 1.6)


def test_width_depth_dial_counts_match_built_models():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from chatforge.plan.scaling import model_shape, preset_config
    from chatforge.plan.shapes import ModelShape

    with torch.device("meta"):
        for size in ("32x2", "48x1", "96x3", "128x4"):
            config = LlamaConfig(**preset_config(size, vocab_size=300))
            model = AutoModelForCausalLM.from_config(config)
            assert ModelShape.from_hf_config(config).n_params == sum(p.numel() for p in model.parameters())
    assert model_shape("tiny")["hidden_size"] == 64
    for bad in ("95x3", "huge", "64x0"):
        with pytest.raises(ValueError):
            model_shape(bad)


def test_plan_budget_and_target_loss_cli(tmp_path, capsys):
    from chatforge.cli import main

    assert main(["plan", "--budget", "1e21", "--serve-tokens", "1e12"]) == 0
    out = capsys.readouterr().out
    assert "published Chinchilla fit" in out and "N_opt ~ C^0.452" in out
    assert "chinchilla-optimal" in out and "train+serve optimal" in out and "less total FLOPs" in out
    # a study's law, priced serving
    law = {"law": {"E": 2.0, "A": 50.0, "B": 80.0, "alpha": 0.4, "beta": 0.3}}
    (tmp_path / "scaling.json").write_text(json.dumps(law))
    assert main(["plan", "--target-loss", "2.5", "--law", str(tmp_path), "--serve-cost", "0.5"]) == 0
    out = capsys.readouterr().out
    assert f"fit in {tmp_path / 'scaling.json'}" in out and "cost" in out
    # MODEL keeps its memory estimate, and both at once work
    assert main(["plan", "tiny", "--budget", "1e18"]) == 0
    out = capsys.readouterr().out
    assert "compute-optimal pretraining budget" in out and "train+serve optimal" in out
    with pytest.raises(SystemExit):
        main(["plan"])
    assert main(["plan", "--target-loss", "1.0"]) == 2  # below E: a one-line error
    assert "irreducible loss" in capsys.readouterr().err


def test_load_law_errors_are_one_line(tmp_path):
    (tmp_path / "bad.json").write_text('{"law": {"E": 1}}')
    with pytest.raises(ConfigError, match="not a chatforge scaling.json"):
        load_law(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="no such file"):
        load_law(tmp_path / "missing.json")
