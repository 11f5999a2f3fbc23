"""The loss law L(N, D) = E + A / N^alpha + B / D^beta and the model sizes it recommends.

Hoffmann et al. (2022, "Chinchilla", approach 3) fit this law to ~400 runs: N parameters, D training
tokens, E the loss no model removes. Training costs C = 6ND, so for a budget C the loss is lowest at

    N_opt = G (C/6)^a,  D_opt = (C/6)^b / G,  a = beta/(alpha+beta), b = alpha/(alpha+beta),
    G = (alpha A / (beta B))^(1/(alpha+beta)).

A model is also used after training: serving D_inf tokens costs about 2N D_inf more FLOPs. Sardana et
al. (2023, "Beyond Chinchilla-Optimal") minimise training plus serving cost at a fixed loss: a model
that will serve many tokens should be smaller and trained on more tokens per parameter.
`train_serve_optimal` does that, with a cost per FLOP for training and for serving hardware.

    >>> law = CHINCHILLA
    >>> round(law.a, 3), round(law.b, 3)
    (0.452, 0.548)
    >>> n, d = compute_optimal(law, 1e21)
    >>> f"{n:.3g} params, {d:.3g} tokens, {d / n:.0f} tokens/param"
    '1.82e+09 params, 9.14e+10 tokens, 50 tokens/param'

Pure math (no numpy, no torch): `chatforge plan` imports it at start-up. Fitting the law to runs is
chatforge.plan.fit.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

FLOPS_PER_TRAIN_TOKEN = 6.0  # per parameter: forward 2, backward 4
FLOPS_PER_SERVED_TOKEN = 2.0  # per parameter: forward only


@dataclass(frozen=True)
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta, with where the constants came from."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = ""

    def loss(self, n: float, d: float) -> float:
        """Predicted loss of `n` parameters trained on `d` tokens (inf where a wild fit overflows)."""
        try:
            return self.E + self.A / n**self.alpha + self.B / d**self.beta
        except (OverflowError, ZeroDivisionError):
            return math.inf

    @property
    def a(self) -> float:
        """Exponent of N_opt in C: N_opt ~ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt in C: D_opt ~ C^b (a + b = 1)."""
        return self.alpha / (self.alpha + self.beta)

    def formula(self) -> str:
        return f"L = {self.E:.4g} + {self.A:.4g}/N^{self.alpha:.3g} + {self.B:.4g}/D^{self.beta:.3g}"

    def to_dict(self) -> dict:
        return asdict(self)


CHINCHILLA = Law(
    1.69, 406.4, 410.7, 0.34, 0.28, "published Chinchilla fit (Hoffmann et al. 2022, approach 3)"
)


def load_law(path: str | Path) -> Law:
    """The law in a study's scaling.json (the file, or the study dir that holds it)."""
    from chatforge.errors import ConfigError

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "scaling.json"
    try:
        data = json.loads(p.read_text())
        c = data["law"]
        return Law(*(float(c[k]) for k in ("E", "A", "B", "alpha", "beta")), source=f"fit in {p}")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file (give a scaling.json or the study dir holding one)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{p}: not a chatforge scaling.json with law E, A, B, alpha, beta ({e})") from None


def compute_optimal(law: Law, flops: float) -> tuple[float, float]:
    """(N, D) with 6ND = `flops` that minimise the law's loss (closed form, see the module docstring)."""
    if flops <= 0:
        raise ValueError(f"flops must be > 0, got {flops}")
    _check_exponents(law)
    g = (law.alpha * law.A / (law.beta * law.B)) ** (1 / (law.alpha + law.beta))
    c = flops / FLOPS_PER_TRAIN_TOKEN
    return g * c**law.a, c**law.b / g


def _check_exponents(law: Law) -> None:
    if not (law.alpha > 0 and law.beta > 0 and law.A > 0 and law.B > 0):
        raise ValueError(f"the law {law.formula()} has no optimum: A, B, alpha and beta must be > 0")


def tokens_for_loss(law: Law, n: float, target: float) -> float:
    """Training tokens that bring `n` parameters to loss `target` (inf when `n` never gets there)."""
    gap = target - law.E - law.A / n**law.alpha
    return math.inf if gap <= 0 else (law.B / gap) ** (1 / law.beta)


@dataclass(frozen=True)
class Choice:
    """A model size and token count, what it costs to train and serve, and the loss it reaches."""

    n: float
    d: float
    loss: float
    train_flops: float
    serve_flops: float
    cost: float  # train_cost * train_flops + serve_cost * serve_flops

    @property
    def tokens_per_param(self) -> float:
        return self.d / self.n

    @property
    def total_flops(self) -> float:
        return self.train_flops + self.serve_flops


def choice(
    law: Law, n: float, d: float, serve_tokens: float = 0.0, train_cost: float = 1.0, serve_cost: float = 1.0
) -> Choice:
    """The costs of training `n` parameters on `d` tokens and serving `serve_tokens` with it."""
    train = FLOPS_PER_TRAIN_TOKEN * n * d
    serve = FLOPS_PER_SERVED_TOKEN * n * serve_tokens
    return Choice(n, d, law.loss(n, d), train, serve, train_cost * train + serve_cost * serve)


def train_serve_optimal(
    law: Law, target_loss: float, serve_tokens: float = 0.0, train_cost: float = 1.0, serve_cost: float = 1.0
) -> Choice:
    """The cheapest (N, D) that reach `target_loss`, counting training and serving `serve_tokens`.

    Along the curve L(N, D) = target, D is a function of N; the cost
    train_cost * 6 N D(N) + serve_cost * 2 N serve_tokens is minimised over log N (one dimension:
    a log-spaced scan, then golden-section search). With serve_tokens = 0 this is the
    Chinchilla-optimal model for that loss.
    """
    _check_exponents(law)
    if target_loss <= law.E:
        raise ValueError(
            f"target loss {target_loss:g} is not above the law's irreducible loss E = {law.E:.4g}"
        )
    if serve_tokens < 0 or train_cost <= 0 or serve_cost < 0:
        raise ValueError("need serve_tokens >= 0, train_cost > 0 and serve_cost >= 0")
    # below n_min no amount of data reaches the target: A / n^alpha alone exceeds target - E
    x_min = math.log(law.A / (target_loss - law.E)) / law.alpha

    def log_cost(x: float) -> float:
        n = math.exp(x)
        d = tokens_for_loss(law, n, target_loss)
        if math.isinf(d):
            return math.inf
        train = math.log(train_cost * FLOPS_PER_TRAIN_TOKEN) + x + math.log(d)
        if not serve_tokens or not serve_cost:
            return train
        serve = math.log(serve_cost * FLOPS_PER_SERVED_TOKEN * serve_tokens) + x
        return max(train, serve) + math.log1p(math.exp(-abs(train - serve)))

    lo, hi, steps = x_min + 1e-9, x_min + 40.0, 4000
    xs = [lo + (hi - lo) * i / steps for i in range(steps + 1)]
    best = min(range(len(xs)), key=lambda i: log_cost(xs[i]))
    a, b = xs[max(best - 1, 0)], xs[min(best + 1, steps)]
    inv_phi = (math.sqrt(5) - 1) / 2
    for _ in range(100):
        c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
        if log_cost(c) < log_cost(d):
            b = d
        else:
            a = c
    n = math.exp((a + b) / 2)
    return choice(law, n, tokens_for_loss(law, n, target_loss), serve_tokens, train_cost, serve_cost)


def compare(
    law: Law,
    budget: float | None = None,
    target_loss: float | None = None,
    serve_tokens: float = 0.0,
    train_cost: float = 1.0,
    serve_cost: float = 1.0,
) -> tuple[float, Choice, Choice]:
    """(target loss, Chinchilla-optimal choice, training+serving-optimal choice) for a target loss,
    or for the loss the compute-optimal model of training `budget` FLOPs reaches."""
    if (budget is None) == (target_loss is None):
        raise ValueError("give exactly one of budget and target_loss")
    if budget is not None:
        n, d = compute_optimal(law, budget)
        target_loss = law.loss(n, d)
    else:
        n = train_serve_optimal(law, target_loss).n
        d = tokens_for_loss(law, n, target_loss)
    chin = choice(law, n, d, serve_tokens, train_cost, serve_cost)
    return target_loss, chin, train_serve_optimal(law, target_loss, serve_tokens, train_cost, serve_cost)


def _si(x: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def format_comparison(target: float, chin: Choice, best: Choice, serve_tokens: float, priced: bool) -> str:
    """The table `chatforge plan --budget/--target-loss` prints."""
    head = f"{'':22} {'params':>8} {'tokens':>8} {'tok/param':>9} {'train FLOPs':>11} {'serve FLOPs':>11} "
    head += f"{'total FLOPs':>11}" + (f" {'cost':>10}" if priced else "")
    lines = [f"target loss {target:.4g}; {_si(serve_tokens)} tokens served", head]
    for name, c in (("chinchilla-optimal", chin), ("train+serve optimal", best)):
        row = f"{name:22} {_si(c.n):>8} {_si(c.d):>8} {c.tokens_per_param:9.1f} {c.train_flops:11.3g} "
        row += f"{c.serve_flops:11.3g} {c.total_flops:11.3g}" + (f" {c.cost:10.3g}" if priced else "")
        lines.append(row)
    what = "cost" if priced else "total FLOPs"
    saved = 1 - (best.cost / chin.cost if priced else best.total_flops / chin.total_flops)
    saved = 0.0 if abs(saved) < 5e-4 else saved  # the search's rounding, not a saving
    lines.append(
        f"the train+serve optimal model is {best.n / chin.n:.2f}x the size, trained on "
        f"{best.d / chin.d:.2f}x the tokens, for {saved:.1%} less {what}"
    )
    return "\n".join(lines)
