"""Each stage's model card (final/README.md) with its held-out result from the run's evaluations."""

from __future__ import annotations

from pathlib import Path

from chatforge.report.content import _change, _read_json, evaluations, stages_of


def held_out_line(stage: str, evals: dict[str, dict], rm: dict | None) -> str | None:
    """The stage's held-out result in one line, for its model card; None when not evaluated."""
    if stage == "rm" and rm:
        return f"pair accuracy {rm['pair_accuracy']:.3f} on {rm['n']} held-out preference pairs"
    if stage not in evals:
        return None
    x = evals[stage]["exact"]
    line = f"exact accuracy {x['accuracy']:.3f} ± {x['stderr']:.3f} on {x['n']} items"
    labels = list(evals)
    at = labels.index(stage)
    if at:
        line += f", {_change(evals[labels[at - 1]]['exact'], x)} vs {labels[at - 1]}"
    return line


def update_cards(run: Path) -> None:
    """Re-write each stage's final/README.md with its held-out result from this report."""
    from chatforge.card import write_card

    evals, rm = evaluations(run), _read_json(run / "eval" / "rm.json")
    for stage in stages_of(run):
        final = run / stage / "final"
        if final.is_dir():
            write_card(final, run / stage, held_out_line(stage, evals, rm))
