"""The run report: `RUN/report.md` and a self-contained `RUN/report.html` (plots embedded as base64).

`write_report(RUN)` reads only what the pipeline left on disk, so it can be re-run at any time
(`chatforge report RUN`, or `python -m chatforge.report RUN`). The pipeline writes it after each
stage. What it holds, in order: held-out accuracy per model with a one-line verdict per change
(beyond noise or not), the reward model's pair accuracy, time/memory/throughput per stage, training
curves (one quantity per panel, `plots`), sample answers of each model against the one before it,
and the config keys the run sets away from the defaults with the command that reproduces it.

    content.py   what the report says, as blocks, from the run folder
    plots.py     the figures (matplotlib, headless)
    render.py    blocks -> Markdown and HTML
"""

from __future__ import annotations

from pathlib import Path

from chatforge.report.cards import held_out_line, update_cards
from chatforge.report.content import build, read_metrics
from chatforge.report.render import to_html, to_markdown

__all__ = ["build", "held_out_line", "main", "read_metrics", "update_cards", "write_report"]


def write_report(run: str | Path) -> Path:
    """Write RUN/report.md and RUN/report.html (atomically), and refresh the stages' model cards;
    returns the .md path."""
    run = Path(run)
    blocks = build(run)
    update_cards(run)
    md, page = run / "report.md", run / "report.html"
    for path, text in ((md, to_markdown(blocks, run)), (page, to_html(blocks))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return md


def main(argv: list[str]) -> int:
    """`chatforge report RUN`: (re)write a pipeline run's report from its folder."""
    import argparse

    from chatforge.errors import ChatforgeError

    p = argparse.ArgumentParser(prog="chatforge report", description=main.__doc__)
    p.add_argument("run", help="the pipeline's run folder (its train.output_dir)")
    run = Path(p.parse_args(argv).run)
    if not run.is_dir():
        raise ChatforgeError(f"{run}: no such run folder")
    print(write_report(run))
    return 0
