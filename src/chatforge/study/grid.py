"""A scaling study's config and its IsoFLOP grid, checked before any run starts.

A study YAML names the corpus, the compute budgets (FLOPs, C = 6ND) and the model sizes (presets or
`WIDTHxDEPTH`); every (budget, size) pair is one pretraining run whose token count is
D = C / (6N), rounded to whole optimizer steps. Nothing here imports torch.

    >>> runs = plan_grid(StudyConfig(data=["c.txt"], budgets=[1e11, 1e12], sizes=["32x2"]), vocab_size=512)
    >>> [(r.name, r.n_params, r.steps) for r in runs]
    [('c1e11-32x2', 38048, 214), ('c1e12-32x2', 38048, 2139)]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from chatforge.errors import ConfigError


@dataclass
class StudyConfig:
    data: list[str] = field(
        default_factory=list, metadata={"help": "corpus files (.txt, .jsonl {text}, ...)"}
    )
    budgets: list[float] = field(default_factory=list, metadata={"help": "compute budgets in FLOPs (6ND)"})
    sizes: list[str] = field(
        default_factory=list, metadata={"help": "model sizes: presets (tiny, micro, ...) or WIDTHxDEPTH"}
    )
    output_dir: str = field(
        default="runs/scaling", metadata={"help": "runs/, report.md, scaling.json go here"}
    )
    tokenizer: str = field(
        default="corpus",
        metadata={
            "help": "'corpus' trains a byte-level BPE of vocab_size on data; or a model dir, 'default'"
        },
    )
    vocab_size: int = field(default=1024, metadata={"help": "vocabulary of the corpus tokenizer"})
    seq_len: int = field(default=128, metadata={"help": "tokens per training block"})
    batch_size: int = field(default=16, metadata={"help": "blocks per optimizer step"})
    eval_fraction: float = field(default=0.02, metadata={"help": "share of blocks held out for the loss"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (cosine decay to 0 over each run)"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of each run's steps spent warming up"})
    seed: int = field(default=0, metadata={"help": "seed of the held-out split, data order and init"})
    predict: list[float] = field(
        default_factory=list, metadata={"help": "budgets to predict the compute-optimal N and D for"}
    )
    check_budget: float = field(
        default=0.0, metadata={"help": "after the fit, run one model at this budget; 0 skips"}
    )
    check_size: str = field(
        default="auto", metadata={"help": "size of the check run; auto = the grid size nearest N_opt"}
    )
    threads: int = field(
        default=0,
        metadata={
            "help": "CPU threads per run; 0 = torch's default, 1 with jobs > 1 (1 is faster on a busy CPU)"
        },
    )
    jobs: int = field(
        default=1,
        metadata={"help": "runs trained at a time, each in a worker process pinned to its own core(s)"},
    )
    bootstrap: int = field(default=100, metadata={"help": "bootstrap refits for the uncertainties"})
    overrides: list[str] = field(
        default_factory=list,
        metadata={"help": "extra pretrain overrides for every run (train.weight_decay=0.1)"},
    )


def describe() -> str:
    """The keys of a study YAML, their defaults and meaning (for --help)."""
    lines = []
    for f in dataclasses.fields(StudyConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {f.name:14} {default!r:14} {f.metadata['help']}")
    return "\n".join(lines)


def _number(value, where: str) -> float:
    try:  # YAML 1.1 reads 1e12 (no dot) as a string
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a number") from None


def load_study(path: str | Path) -> StudyConfig:
    """Read and check a study YAML: unknown keys, types and empty lists are one-line errors."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such study config")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a study config is a mapping of keys (see chatforge scaling study --help)")
    return study_from_dict(raw, str(p))


def study_from_dict(raw: dict, where: str = "study") -> StudyConfig:
    fields = {f.name: f for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    values = {}
    for key, value in raw.items():
        at = f"{where}: {key}"
        kind = fields[key].type
        if kind.startswith("list"):
            items = value if isinstance(value, list) else [value]
            values[key] = [_number(v, at) for v in items] if "float" in kind else [str(v) for v in items]
        elif kind == "float":
            values[key] = _number(value, at)
        elif kind == "int":
            if isinstance(value, bool) or _number(value, at) != int(_number(value, at)):
                raise ConfigError(f"{at}: {value!r} is not a whole number")
            values[key] = int(_number(value, at))
        else:
            values[key] = str(value)
    cfg = StudyConfig(**values)
    for key in ("data", "budgets", "sizes"):
        if not getattr(cfg, key):
            raise ConfigError(f"{where}: {key} is empty")
    if cfg.jobs < 1:
        raise ConfigError(f"{where}: jobs must be 1 or more runs at a time (got {cfg.jobs})")
    return cfg


@dataclass(frozen=True)
class GridRun:
    """One pretraining run of the study."""

    size: str
    budget: float  # the nominal budget it belongs to
    n_params: int
    steps: int
    tokens_per_step: int
    kind: str = "grid"  # or "check": the run the fit predicts, kept out of the fit

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return 6.0 * self.n_params * self.tokens

    @property
    def name(self) -> str:
        prefix = "check-" if self.kind == "check" else ""
        return f"{prefix}c{self.budget:.3g}-{self.size}".replace("+", "")


def count_params(size: str, vocab_size: int) -> int:
    """Parameters of a study size (tied embeddings), counted from its shape alone."""
    from chatforge.plan.scaling import model_shape, preset_config
    from chatforge.plan.shapes import ModelShape

    try:
        model_shape(size)
    except ValueError as e:
        raise ConfigError(f"sizes: {e}") from None
    return ModelShape.from_hf_config(preset_config(size, vocab_size)).n_params


def plan_run(size: str, budget: float, vocab_size: int, tokens_per_step: int, kind: str = "grid") -> GridRun:
    """The run of `size` that spends `budget` FLOPs: whole steps of `tokens_per_step` tokens."""
    if not budget > 0:
        raise ConfigError(f"budgets: {budget:g} is not a positive number of FLOPs")
    n = count_params(size, vocab_size)
    per_step = 6.0 * n * tokens_per_step
    if budget < per_step:
        raise ConfigError(
            f"budget {budget:.3g} FLOPs is too small for size {size} ({n:,} parameters): one step of "
            f"{tokens_per_step:,} tokens costs {per_step:.3g} FLOPs; raise the budget or drop the size"
        )
    return GridRun(size, budget, n, max(1, round(budget / per_step)), tokens_per_step, kind)


def plan_grid(cfg: StudyConfig, vocab_size: int) -> list[GridRun]:
    """Every (budget, size) run of the study, or a ConfigError naming the first bad one."""
    if cfg.seq_len < 2 or cfg.batch_size < 1:
        raise ConfigError("seq_len must be at least 2 and batch_size at least 1")
    if not 0 < cfg.eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be between 0 and 1 (got {cfg.eval_fraction:g})")
    per_step = cfg.seq_len * cfg.batch_size
    runs = [plan_run(s, c, vocab_size, per_step) for c in sorted(set(cfg.budgets)) for s in cfg.sizes]
    if len(runs) < 2:
        raise ConfigError(
            "a study needs at least 2 runs (5+ to fit the law, 3+ sizes per budget for IsoFLOP minima)"
        )
    if len({r.n_params for r in runs}) < len(set(cfg.sizes)):
        raise ConfigError(f"sizes: two of {', '.join(cfg.sizes)} have the same parameter count")
    if cfg.check_budget:
        check_sizes = cfg.sizes if cfg.check_size == "auto" else [cfg.check_size]
        for s in check_sizes:
            plan_run(s, cfg.check_budget, vocab_size, per_step, "check")
    for p in predict_budgets(cfg):
        if p <= 0:
            raise ConfigError(f"predict: {p:g} is not a positive number of FLOPs")
    return runs


def predict_budgets(cfg: StudyConfig) -> list[float]:
    return sorted(set(cfg.predict) | ({cfg.check_budget} if cfg.check_budget else set()))


def nearest_size(sizes: list[str], vocab_size: int, n_opt: float) -> str:
    """The size whose parameter count is nearest `n_opt` on a log scale."""
    return min(sizes, key=lambda s: abs(math.log(count_params(s, vocab_size) / n_opt)))


def longest_first(runs: list[GridRun]) -> list[GridRun]:
    """`runs` in the order a pool of workers should start them: the longest first, so that no long
    run starts last. Cost is the budget, then the step count: tiny models on a CPU are bound by the
    per-step overhead more than by FLOPs, so within a budget the smallest size runs longest.

    >>> runs = [plan_run(s, c, 512, 64) for c in (1e10, 4e10) for s in ("32x1", "32x2")]
    >>> [r.name for r in longest_first(runs)]
    ['c4e10-32x1', 'c4e10-32x2', 'c1e10-32x1', 'c1e10-32x2']
    """
    return sorted(runs, key=lambda r: (r.budget, r.steps), reverse=True)
