"""The model card of a training output: `OUTPUT/final/README.md`, in place of peft's empty template.

`write_card(final, out)` reads what the stage left in its output dir (`config.yaml`, `stage`,
`metrics.jsonl`) and says what the model is: its base, data, stage(s), last training metrics, and,
once the pipeline report exists, the held-out results (`evaluation`, one line from the report). The
front matter holds the hub's `base_model` / `library_name` fields, so the hub and tools that read
cards see the base. Pure text from files on disk: it can be re-written at any time.
"""

from __future__ import annotations

import json
from pathlib import Path

_STAGE_TEXT = {
    "pretrain": "a causal LM pretrained from scratch",
    "sft": "a chat model after supervised fine-tuning",
    "rm": "a reward model (a causal LM backbone plus a scalar score head, `score_head.safetensors`)",
    "dpo": "a chat model after direct preference optimisation",
    "ppo": "a chat model after RLHF with PPO",
    "grpo": "a chat model after GRPO",
}


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _last_metrics(path: Path) -> dict:
    """The last logged training row of a metrics.jsonl (numbers only), {} when there is none."""
    last: dict = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            last = {k: v for k, v in row.items() if isinstance(v, (int, float))} or last
    return last


def _base(final: Path, cfg: dict) -> str:
    adapter = final / "adapter_config.json"
    if adapter.is_file():
        return json.loads(adapter.read_text()).get("base_model_name_or_path") or "?"
    return str((cfg.get("model") or {}).get("path", "?"))


def card_text(final: Path, out: Path, evaluation: str | None = None) -> str:
    """The card's markdown for the saved dir `final` of the stage whose output dir is `out`."""
    from chatforge.models.load import DEFAULT_HUB_ID, HUB_ID

    cfg = _read_yaml(out / "config.yaml")
    stage = (out / "stage").read_text().strip() if (out / "stage").is_file() else "?"
    is_adapter = (final / "adapter_config.json").is_file()
    base = _base(final, cfg)
    peft = cfg.get("peft") or {}
    data = cfg.get("data") or {}
    run_stages = (_read_yaml(out.parent / "config.yaml").get("pipeline") or {}).get("stages")
    front = ["---"]
    if HUB_ID.match(base) and not base.startswith("."):
        front.append(f"base_model: {base}")
    front += [f"library_name: {'peft' if is_adapter else 'transformers'}", "tags:", "- chatforge"]
    front += [f"- {stage}", "---", ""]
    method = peft.get("method", "none")
    if method in ("lora", "qlora"):
        method += f" (r={peft.get('r')}, alpha={peft.get('alpha')})"
    lines = [f"# {stage}: {_STAGE_TEXT.get(stage, 'a chatforge model')}", ""]
    lines.append(
        f"- Base model: `{base}`" + (" (chatforge's embedded Q4_1 copy)" if base == DEFAULT_HUB_ID else "")
    )
    lines.append(f"- Fine-tuning: {'full' if method == 'none' else method}")
    files = [str(f) for f in data.get("train") or []]
    lines.append(f"- Training data: {', '.join(f'`{f}`' for f in files) or 'none recorded'}")
    if run_stages:
        lines.append(f"- Pipeline: {' -> '.join(run_stages)} (this is the {stage} stage)")
    metrics = _last_metrics(out / "metrics.jsonl")
    if metrics:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch")
        lines.append(f"- Last training log: {shown}")
    if evaluation:
        lines.append(f"- Held-out: {evaluation}")
    lines += ["", "## Load it", "", "```python"]
    if is_adapter:
        lines += [
            "from peft import AutoPeftModelForCausalLM  # the base is read from adapter_config.json",
            "model = AutoPeftModelForCausalLM.from_pretrained(PATH_TO_THIS_DIR)",
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "model = AutoModelForCausalLM.from_pretrained(PATH_TO_THIS_DIR)",
        ]
    lines += ["```", ""]
    if stage == "rm":
        lines += [
            "Score with `chatforge.reward.score_texts` or `chatforge score`; `chatforge export-rm` writes "
            "an `AutoModelForSequenceClassification` dir. Input rendering: docs/outputs.md.",
            "",
        ]
    lines.append("Written by chatforge; see docs/outputs.md for what each file is.")
    return "\n".join(front + lines) + "\n"


def write_card(final: str | Path, out: str | Path, evaluation: str | None = None) -> Path:
    """Write `final/README.md` (see `card_text`); returns its path."""
    final = Path(final)
    path = final / "README.md"
    path.write_text(card_text(final, Path(out), evaluation), encoding="utf-8")
    return path
