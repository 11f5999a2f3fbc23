"""What a scaling study found: the fits, their bootstrap spread, predictions; report.md, scaling.png, scaling.json.

`analyse(results, ...)` turns the runs' result.json records into one JSON-able dict: the approach-3
law with bootstrap percentiles per constant, the approach-2 IsoFLOP minima and frontier, and
the compute-optimal N and D (with their spread) for the budgets asked about. `write` renders it.
`chatforge plan --law OUTPUT/scaling.json` reads the law back (chatforge.plan.law.load_law).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from chatforge.plan.fit import Point, bootstrap, fit_frontier, fit_law, isoflop_minima, spread
from chatforge.plan.law import Law, compute_optimal

BOOT_KEY = "_bootstrap"  # the refits themselves: kept in memory for predictions, not written


def budget_key(flops: float) -> str:
    """How a budget names its prediction in scaling.json: '1e+13'."""
    return f"{flops:.6g}"


def _points(results: list[dict]) -> list[Point]:
    return [Point(r["n_params"], r["tokens"], r["eval_loss"], r["budget"]) for r in results]


def analyse(results: list[dict], predict: list[float], n_boot: int = 100, seed: int = 0) -> dict:
    """Fit both approaches to the grid `results` and predict the optimum at each budget in `predict`."""
    points = _points(results)
    notes = []
    if len(points) < 5:
        notes.append(f"only {len(points)} runs for 5 constants: the approach-3 fit is underdetermined")
    law = fit_law(points, source="approach 3 fit of this study")
    boots = bootstrap(points, n_boot, seed, start=law) if n_boot else []
    laws = [b[0] for b in boots]
    out: dict = {"law": law.to_dict(), "a": law.a, "b": law.b, "n_bootstrap": len(boots)}
    out["uncertainty"] = {
        k: spread([getattr(x, k) for x in laws]) for k in ("E", "A", "B", "alpha", "beta", "a", "b")
    }
    runs = []
    for r in results:
        pred = law.loss(r["n_params"], r["tokens"])
        runs.append({**r, "predicted_loss": pred, "residual": r["eval_loss"] / pred - 1})
    out["runs"] = runs
    minima = isoflop_minima(points)
    a2: dict = {
        "minima": [
            {
                "budget": m.budget,
                "n_opt": m.n_opt,
                "d_opt": m.d_opt,
                "loss": m.loss,
                "bracketed": m.bracketed,
                "coeffs": [float(x) for x in m.coeffs],
            }
            for m in minima
        ]
    }
    try:
        front = fit_frontier(minima)
        a2.update(a=front.a, b=front.b, k=front.k)
        a2["a_spread"] = spread([f.a for _, f in boots if f is not None])
    except ValueError as e:
        a2["note"] = f"no approach-2 frontier: {e} (needs 3+ sizes per budget that bracket the minimum)"
        notes.append(a2["note"])
        front = None
    if any(not m.bracketed for m in minima):
        notes.append("some IsoFLOP minima lie outside the sizes run at their budget: extrapolated")
    out["approach2"] = a2
    out["predictions"] = {}
    try:
        compute_optimal(law, 1.0)
    except ValueError as e:  # e.g. alpha < 0: the runs say bigger is worse at every budget
        notes.append(f"no compute-optimal sizes: {e}")
        predict = []
    for c in predict:
        n, d = compute_optimal(law, c)
        bn = [nd for nd in (_optimum(x, c) for x in laws) if nd is not None]
        with_nd = [(x, nd) for x in laws if (nd := _optimum(x, c)) is not None]
        out["predictions"][budget_key(c)] = {
            "budget": c,
            "n_opt": n,
            "d_opt": d,
            "tokens_per_param": d / n,
            "loss": law.loss(n, d),
            "n_opt_spread": spread([x[0] for x in bn]),
            "d_opt_spread": spread([x[1] for x in bn]),
            "loss_spread": spread([x.loss(*nd) for x, nd in with_nd]),
            "approach2_n_opt": front.n_opt(c) if front else None,
        }
    out["notes"] = notes
    out[BOOT_KEY] = laws
    return out


def _optimum(law: Law, flops: float) -> tuple[float, float] | None:
    try:
        return compute_optimal(law, flops)
    except ValueError:
        return None


def add_check_prediction(
    analysis: dict, size: str, n: int, tokens: int, budget: float, beside: bool | None = None
) -> None:
    """Predict the held-out loss of a run outside the grid from the fit of the grid runs alone.

    `beside`: the check run trained beside the grid (True; its result is read only after this
    prediction is written), after the fit (False), or unknown (None: a refit of finished runs).
    """
    law = Law(**analysis["law"])
    analysis["check"] = {
        "size": size,
        "n_params": n,
        "tokens": tokens,
        "budget": budget,
        "predicted_loss": law.loss(n, tokens),
        "predicted_spread": spread([x.loss(n, tokens) for x in analysis.get(BOOT_KEY, [])]),
        "trained_beside_grid": beside,
    }


def add_check_measurement(analysis: dict, result: dict) -> None:
    c = analysis["check"]
    c.update(measured_loss=result["eval_loss"], seconds=result.get("seconds"))
    c["error"] = result["eval_loss"] / c["predicted_loss"] - 1
    s = c["predicted_spread"]
    c["within_p5_p95"] = bool(s["n"]) and s["p5"] <= result["eval_loss"] <= s["p95"]


def write(out: Path, analysis: dict) -> None:
    """OUTPUT/scaling.json, scaling.png and report.md."""
    data = {k: v for k, v in analysis.items() if k != BOOT_KEY}
    (out / "scaling.json").write_text(json.dumps(data, indent=1, default=_finite))
    plot(out / "scaling.png", analysis)
    (out / "report.md").write_text(markdown(analysis))


def _finite(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _pm(s: dict, fmt: str = ".3g") -> str:
    if not s or not s.get("n"):
        return "n/a"
    return f"± {s['std']:{fmt}} [{s['p5']:{fmt}}, {s['p95']:{fmt}}]"


def markdown(a: dict) -> str:
    law = Law(**a["law"])
    u = a["uncertainty"]
    lines = [
        "# Scaling study",
        "",
        f"{len(a['runs'])} runs; loss = final held-out loss (nats per token). Uncertainties: bootstrap "
        f"over runs ({a['n_bootstrap']} refits, resampled within each budget): ± std [5th, 95th percentile].",
        "",
        "## Approach 3: L(N, D) = E + A/N^alpha + B/D^beta",
        "",
        "| constant | fit | bootstrap |",
        "|---|---|---|",
    ]
    for k in ("E", "A", "B", "alpha", "beta"):
        lines.append(f"| {k} | {a['law'][k]:.4g} | {_pm(u[k])} |")
    lines.append(f"| a = beta/(alpha+beta) | {law.a:.3f} | {_pm(u['a'])} |")
    lines.append(f"| b = alpha/(alpha+beta) | {law.b:.3f} | {_pm(u['b'])} |")
    a2 = a["approach2"]
    lines += [
        "",
        "## Approach 2: IsoFLOP minima",
        "",
        "| budget (FLOPs) | N_opt | D_opt | loss | bracketed |",
    ]
    lines.append("|---|---|---|---|---|")
    for m in a2["minima"]:
        lines.append(
            f"| {m['budget']:.3g} | {m['n_opt']:.3g} | {m['d_opt']:.3g} | {m['loss']:.4f} | "
            f"{'yes' if m['bracketed'] else 'no'} |"
        )
    if "a" in a2:
        lines += [
            "",
            f"Frontier: N_opt ~ C^{a2['a']:.3f} {_pm(a2['a_spread'])}, D_opt ~ C^{a2['b']:.3f} "
            f"(approach 3 implies a = {law.a:.3f}).",
        ]
    else:
        lines += ["", a2["note"]]
    if a["predictions"]:
        lines += ["", "## Compute-optimal sizes (approach 3)", ""]
        lines += [
            "| budget | N_opt | D_opt | tokens/param | loss | N_opt (approach 2) |",
            "|---|---|---|---|---|---|",
        ]
        for p in a["predictions"].values():
            n2 = f"{p['approach2_n_opt']:.3g}" if p["approach2_n_opt"] else "n/a"
            lines.append(
                f"| {p['budget']:.3g} | {p['n_opt']:.3g} {_pm(p['n_opt_spread'])} | {p['d_opt']:.3g} | "
                f"{p['tokens_per_param']:.1f} | {p['loss']:.4f} {_pm(p['loss_spread'], '.4f')} | {n2} |"
            )
    if "check" in a:
        c = a["check"]
        lines += ["", "## Check: a run outside the grid, predicted from the grid runs only", ""]
        order = {
            True: "The check run trained beside the grid runs; its loss was read only after this "
            "prediction, fitted to the grid runs alone, had been written to scaling.json.",
            False: "The prediction, fitted to the grid runs alone, was written to scaling.json "
            "before the check run was trained.",
            None: "Refitted from the grid runs alone by `chatforge scaling fit`, after the check run.",
        }
        lines += [order[c.get("trained_beside_grid")], ""]
        lines.append(
            f"size {c['size']} ({c['n_params']:,} params) x {c['tokens']:,} tokens ({c['budget']:.3g} FLOPs): "
            f"predicted {c['predicted_loss']:.4f} {_pm(c['predicted_spread'], '.4f')}"
        )
        if "measured_loss" in c:
            inside = "inside" if c["within_p5_p95"] else "outside"
            lines.append(f"measured {c['measured_loss']:.4f} ({c['error']:+.2%}; {inside} the 5-95% band)")
    lines += ["", "## Runs", "", "| run | N | D | tokens/param | epochs | loss | predicted | residual | s |"]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in a["runs"]:
        lines.append(
            f"| {r['name']} | {r['n_params']:,} | {r['tokens']:,} | {r['tokens'] / r['n_params']:.1f} | "
            f"{r.get('epochs', 0):.2f} | {r['eval_loss']:.4f} | {r['predicted_loss']:.4f} | "
            f"{r['residual']:+.2%} | {r.get('seconds') or 0:.0f} |"
        )
    if a["notes"]:
        lines += ["", "## Caveats", ""] + [f"- {n}" for n in a["notes"]]
    lines += ["", "![IsoFLOP curves, frontier, residuals](scaling.png)", ""]
    return "\n".join(lines)


def _band(value: float, s: dict) -> list[list[float]]:
    """matplotlib's yerr for a 5-95% band around `value`; a point fit outside its own bootstrap
    band (a loose law) gets no bar on that side rather than a negative one.

    >>> _band(10.0, {"p5": 8.0, "p95": 11.0}), _band(10.0, {"p5": 12.0, "p95": 15.0})
    ([[2.0], [1.0]], [[0.0], [5.0]])
    """
    return [[max(0.0, value - s["p5"])], [max(0.0, s["p95"] - value)]]


def plot(path: Path, a: dict) -> None:
    """Three panels: IsoFLOP curves with their minima, the N_opt frontier, residuals of approach 3."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    law = Law(**a["law"])
    runs = a["runs"]
    budgets = sorted({r["budget"] for r in runs})
    colors = {c: plt.cm.viridis(i / max(1, len(budgets) - 1)) for i, c in enumerate(budgets)}
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.8))
    minima = {m["budget"]: m for m in a["approach2"]["minima"]}
    for c in budgets:
        group = sorted((r for r in runs if r["budget"] == c), key=lambda r: r["n_params"])
        ns = np.array([r["n_params"] for r in group], dtype=float)
        ax1.scatter(ns, [r["eval_loss"] for r in group], color=colors[c], label=f"C = {c:.2g}")
        grid = np.geomspace(ns.min() / 1.5, ns.max() * 1.5, 100)
        ax1.plot(grid, [law.loss(n, c / (6 * n)) for n in grid], "--", color=colors[c], lw=1)
        m = minima.get(c)
        if m and math.isfinite(m["n_opt"]):
            c2, c1, c0 = m["coeffs"]
            x = np.log(grid)
            ax1.plot(grid, c2 * x**2 + c1 * x + c0, color=colors[c], lw=1.5)
            if m["bracketed"]:  # an extrapolated vertex can sit decades away: not drawn
                ax1.scatter([m["n_opt"]], [m["loss"]], marker="*", s=160, color=colors[c], edgecolor="k")
    if "check" in a and "measured_loss" in a["check"]:
        ch = a["check"]
        ax1.scatter(
            [ch["n_params"]], [ch["measured_loss"]], marker="D", color="red", label="check (measured)"
        )
        ax1.scatter(
            [ch["n_params"]], [ch["predicted_loss"]], marker="x", color="red", label="check (predicted)"
        )
    ax1.set(
        xscale="log", xlabel="parameters N", ylabel="held-out loss", title="IsoFLOP curves (- - approach 3)"
    )
    ax1.legend(fontsize=8)

    lo = min(budgets) / 3
    hi = max([*budgets, *(p["budget"] for p in a["predictions"].values())]) * 3
    cs = np.geomspace(lo, hi, 50)
    if _optimum(law, 1.0) is not None:  # a law with alpha or beta <= 0 has no frontier to draw
        ax2.plot(
            cs, [compute_optimal(law, c)[0] for c in cs], "--", color="k", label=f"approach 3 (a={law.a:.2f})"
        )
    good = [m for m in a["approach2"]["minima"] if math.isfinite(m["n_opt"]) and m["bracketed"]]
    if good:
        ax2.scatter(
            [m["budget"] for m in good], [m["n_opt"] for m in good], color="C1", label="IsoFLOP minima"
        )
    if "a" in a["approach2"]:
        a2 = a["approach2"]
        ax2.plot(cs, a2["k"] * cs ** a2["a"], color="C1", label=f"approach 2 (a={a2['a']:.2f})")
    for p in a["predictions"].values():
        s = p["n_opt_spread"]
        if s.get("n"):
            ax2.errorbar(
                [p["budget"]],
                [p["n_opt"]],
                yerr=_band(p["n_opt"], s),
                fmt="o",
                color="C2",
                capsize=3,
            )
    ax2.set(
        xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="N_opt", title="compute-optimal size"
    )
    ax2.legend(fontsize=8)

    for c in budgets:
        group = [r for r in runs if r["budget"] == c]
        ax3.scatter([r["n_params"] for r in group], [100 * r["residual"] for r in group], color=colors[c])
    if "check" in a and "measured_loss" in a["check"]:
        ax3.scatter([a["check"]["n_params"]], [100 * a["check"]["error"]], marker="D", color="red")
    ax3.axhline(0, color="k", lw=0.8)
    ax3.set(xscale="log", xlabel="parameters N", ylabel="measured / predicted - 1 (%)", title="residuals")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
