"""Fit a loss law to training runs: Chinchilla's approaches 3 and 2, and a bootstrap over runs.

Approach 3 (Hoffmann et al. 2022, appendix D.2) fits L(N, D) = E + A/N^alpha + B/D^beta to every
run at once. With a = log A, b = log B, e = log E it minimises

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),   delta = 1e-3

(LSE = log-sum-exp, so the prediction's log is computed without overflow) with L-BFGS. The problem
has many local minima, so Chinchilla starts L-BFGS from every point of a grid. Here the whole grid
(4,500 points, the paper's) is scored in one vectorised pass and L-BFGS starts from the best
`top_k` of them: the grid points L-BFGS would descend from worst are skipped, which keeps a
bootstrap of hundreds of fits within seconds. torch's L-BFGS (float64, strong-Wolfe line search)
does the descent, so no scipy is needed.

Approach 2 fits a parabola to loss against log N for each compute budget (an IsoFLOP curve); its
vertex is that budget's optimal N. A line through log N_opt against log C gives N_opt ~ C^a, and
D_opt = C / (6 N_opt) ~ C^(1-a).

`bootstrap` resamples runs with replacement within each budget (so every budget keeps an IsoFLOP
curve) and refits both; the spread of the refits is the uncertainty a study reports.

    >>> import math
    >>> law = Law(1.8, 400.0, 400.0, 0.35, 0.3)
    >>> pts = [Point(n, d, law.loss(n, d), 6 * n * d) for n in (1e7, 1e8, 1e9) for d in (1e9, 1e10, 1e11)]
    >>> fit = fit_law(pts)
    >>> round(fit.alpha, 2), round(fit.beta, 2), round(fit.E, 2)
    (0.35, 0.3, 1.8)
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from chatforge.plan.law import FLOPS_PER_TRAIN_TOKEN, Law

HUBER_DELTA = 1e-3
# Chinchilla's initialisation grid: alpha, beta, e = log E, a = log A, b = log B.
GRID = dict(
    alpha=(0.0, 0.5, 1.0, 1.5, 2.0),
    beta=(0.0, 0.5, 1.0, 1.5, 2.0),
    e=(-1.0, -0.5, 0.0, 0.5, 1.0),
    a=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    b=(0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
)


@dataclass(frozen=True)
class Point:
    """One training run: parameters, training tokens, final held-out loss, its nominal budget."""

    n: float
    d: float
    loss: float
    budget: float


@dataclass(frozen=True)
class Minimum:
    """The vertex of one budget's IsoFLOP parabola loss = c2 x^2 + c1 x + c0, x = log N."""

    budget: float
    n_opt: float  # nan when the parabola opens downwards (no minimum)
    loss: float
    coeffs: tuple[float, float, float]
    bracketed: bool  # the vertex lies within the sizes run at this budget

    @property
    def d_opt(self) -> float:
        return self.budget / (FLOPS_PER_TRAIN_TOKEN * self.n_opt)


@dataclass(frozen=True)
class Frontier:
    """N_opt = k C^a from the IsoFLOP minima (approach 2); D_opt = C / (6 N_opt)."""

    a: float
    k: float

    @property
    def b(self) -> float:
        return 1.0 - self.a

    def n_opt(self, flops: float) -> float:
        return self.k * flops**self.a


def _columns(points: Sequence[Point]):
    import numpy as np

    if len(points) < 2:  # fewer than 5 runs leave the fit underdetermined: callers say so
        raise ValueError(f"a fit needs at least 2 runs, got {len(points)}")
    logn = np.log([p.n for p in points])
    logd = np.log([p.d for p in points])
    logl = np.log([p.loss for p in points])
    return logn, logd, logl


def _grid_scores(logn, logd, logl, delta: float):
    """(grid thetas [G, 5] as (a, b, e, alpha, beta), the objective at each)."""
    import numpy as np

    rows = list(itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"]))
    th = np.array(rows)
    t1 = th[:, :1] - th[:, 3:4] * logn[None]
    t2 = th[:, 1:2] - th[:, 4:5] * logd[None]
    pred = np.logaddexp(np.logaddexp(t1, t2), th[:, 2:3])
    r = np.abs(pred - logl[None])
    huber = np.where(r < delta, 0.5 * r**2, delta * (r - 0.5 * delta))
    return th, huber.sum(1)


def _lbfgs(theta0, logn, logd, logl, delta: float) -> tuple[list[float], float]:
    """Descend from theta0 = (a, b, e, alpha, beta); returns (theta, objective)."""
    import torch

    n, d, y = (torch.as_tensor(v, dtype=torch.float64) for v in (logn, logd, logl))
    theta = torch.tensor(list(theta0), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=200,
        tolerance_grad=1e-9,
        tolerance_change=1e-9,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective():
        a, b, e, alpha, beta = theta
        pred = torch.logsumexp(torch.stack([a - alpha * n, b - beta * d, e.expand_as(n)]), 0)
        # divided by delta so the objective is O(residual), not O(1e-3 * residual): L-BFGS's
        # tolerances are absolute
        return torch.nn.functional.huber_loss(pred, y, delta=delta, reduction="sum") / delta

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    # five parameters and a few dozen runs: thread hand-offs cost more than the maths (20x slower
    # with 2 threads on a busy 2-core machine), so descend on one thread
    torch.set_num_threads(1)
    try:
        opt.step(closure)
        with torch.no_grad():
            value = float(objective())
    finally:
        torch.set_num_threads(threads)
    theta_out = theta.detach().tolist()
    # a descent that ran off to A, B or E beyond float range has not found a law
    sane = all(math.isfinite(t) for t in theta_out) and max(theta_out[:3]) < 700
    return theta_out, value if sane and math.isfinite(value) else math.inf


def fit_law(
    points: Sequence[Point],
    delta: float = HUBER_DELTA,
    top_k: int = 8,
    extra_inits: Sequence[Sequence[float]] = (),
    source: str = "",
) -> Law:
    """Approach 3: the law that minimises the Huber loss of log-residuals over `points`.

    L-BFGS starts from the `top_k` best grid points and from `extra_inits` (thetas
    (log A, log B, log E, alpha, beta), e.g. a previous fit's) and the lowest objective wins.
    """
    import numpy as np

    logn, logd, logl = _columns(points)
    th, scores = _grid_scores(logn, logd, logl, delta)
    starts = [th[i] for i in np.argsort(scores)[:top_k]] + [np.asarray(t) for t in extra_inits]
    best, best_value = None, math.inf
    for start in starts:
        theta, value = _lbfgs(start, logn, logd, logl, delta)
        if value < best_value:
            best, best_value = theta, value
    if best is None:
        raise ValueError("the fit diverged from every initialisation")
    a, b, e, alpha, beta = best
    return Law(math.exp(e), math.exp(a), math.exp(b), alpha, beta, source)


def law_theta(law: Law) -> list[float]:
    """The fit's parameters (log A, log B, log E, alpha, beta) of a law, to start another fit from."""
    return [math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta]


def by_budget(points: Sequence[Point]) -> dict[float, list[Point]]:
    groups: dict[float, list[Point]] = {}
    for p in points:
        groups.setdefault(p.budget, []).append(p)
    return dict(sorted(groups.items()))


def isoflop_minima(points: Sequence[Point]) -> list[Minimum]:
    """Approach 2, step 1: one parabola in log N per budget with at least 3 distinct sizes."""
    import numpy as np

    out = []
    for budget, group in by_budget(points).items():
        x = np.log([p.n for p in group])
        if len(set(np.round(x, 9))) < 3:
            continue
        c2, c1, c0 = np.polyfit(x, [p.loss for p in group], 2)
        if c2 <= 0:
            out.append(Minimum(budget, math.nan, min(p.loss for p in group), (c2, c1, c0), False))
            continue
        x_opt = -c1 / (2 * c2)
        loss = c0 - c1**2 / (4 * c2)
        out.append(Minimum(budget, math.exp(x_opt), loss, (c2, c1, c0), bool(x.min() <= x_opt <= x.max())))
    return out


def fit_frontier(minima: Sequence[Minimum]) -> Frontier:
    """Approach 2, step 2: log N_opt = log k + a log C through the budgets whose minimum lies within
    the sizes run there (an extrapolated vertex says more about the parabola than about the runs)."""
    import numpy as np

    good = [m for m in minima if math.isfinite(m.n_opt) and m.bracketed]
    if len(good) < 2:
        raise ValueError(f"a frontier needs bracketed IsoFLOP minima at 2 or more budgets, got {len(good)}")
    a, log_k = np.polyfit(np.log([m.budget for m in good]), np.log([m.n_opt for m in good]), 1)
    return Frontier(float(a), math.exp(log_k))


def bootstrap(
    points: Sequence[Point], n_boot: int = 200, seed: int = 0, start: Law | None = None, top_k: int = 2
) -> list[tuple[Law, Frontier | None]]:
    """Refits of both approaches on `n_boot` resamples of the runs (with replacement, per budget).

    Each approach-3 refit starts from `start` (the full fit) and the resample's `top_k` best grid
    points. A resample whose IsoFLOP curves give fewer than 2 minima has no frontier (None).
    """
    rng = random.Random(seed)
    groups = list(by_budget(points).values())
    extra = [law_theta(start)] if start is not None else []
    out = []
    for _ in range(n_boot):
        sample = [rng.choice(g) for g in groups for _ in g]
        try:
            law = fit_law(sample, top_k=top_k, extra_inits=extra)
        except ValueError:  # every start diverged on this resample: leave it out
            continue
        try:
            frontier = fit_frontier(isoflop_minima(sample))
        except ValueError:
            frontier = None
        out.append((law, frontier))
    return out


def spread(values: Sequence[float]) -> dict[str, float]:
    """Standard deviation and 5th / 50th / 95th percentiles of bootstrap values (finite ones)."""
    xs = sorted(v for v in values if math.isfinite(v))
    if not xs:
        return {"std": math.nan, "p5": math.nan, "p50": math.nan, "p95": math.nan, "n": 0}
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((v - mean) ** 2 for v in xs) / max(len(xs) - 1, 1))

    def pct(q: float) -> float:
        i = q * (len(xs) - 1)
        lo = int(math.floor(i))
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)

    return {"std": std, "p5": pct(0.05), "p50": pct(0.5), "p95": pct(0.95), "n": len(xs)}
