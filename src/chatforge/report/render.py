"""The report's blocks as Markdown (images linked from RUN/plots/) and as one self-contained HTML page
(images embedded as base64). A block is ("h", level, text), ("p", text), ("table", head, rows),
("img", path) or ("pre", language, text)."""

from __future__ import annotations

import base64
import html
from pathlib import Path


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[tuple], run: Path) -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append(f"{'#' * b[1]} {b[2]}\n")
        elif b[0] == "p":
            out.append(f"{b[1]}\n")
        elif b[0] == "table":
            out.append("| " + " | ".join(map(_md_cell, b[1])) + " |")
            out.append("|" + "---|" * len(b[1]))
            out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b[2]]
            out.append("")
        elif b[0] == "img":
            out.append(f"![{b[1].stem}]({b[1].relative_to(run)})\n")
        elif b[0] == "pre":
            out.append(f"```{b[1]}\n{b[2]}```\n")
    return "\n".join(out)


def to_html(blocks: list[tuple]) -> str:
    e = html.escape
    body = []
    for b in blocks:
        if b[0] == "h":
            body.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            body.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{e(str(c))}</th>" for c in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
        elif b[0] == "img":
            data = base64.b64encode(b[1].read_bytes()).decode()
            body.append(f'<img alt="{e(b[1].stem)}" src="data:image/png;base64,{data}">')
        elif b[0] == "pre":
            body.append(f"<pre>{e(b[2])}</pre>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "font-size:13px;text-align:left}img{max-width:100%;display:block;margin:1em 0}"
        "pre{background:#f6f6f6;padding:1em;font-size:12px;overflow:auto}"
    )
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>chatforge report</title>'
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )
