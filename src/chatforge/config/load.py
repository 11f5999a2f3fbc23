"""Reading configs: YAML files and dotted CLI overrides -> a validated `Config` (types, allowed
values, the value rules below), and back to YAML; `describe` lists every key with its help."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

from chatforge.config.schema import Config
from chatforge.errors import ConfigError
from chatforge.tracking import TRACKERS

# Value checks that types alone cannot express: (key, predicate, what it must be).
_RULES = [
    ("data.max_length", lambda v: v > 0, "a positive integer"),
    ("data.pad_to_multiple_of", lambda v: v > 0, "a positive integer"),
    ("train.batch_size", lambda v: v > 0, "a positive integer"),
    ("train.grad_accum", lambda v: v > 0, "a positive integer"),
    ("train.max_steps", lambda v: v >= 0, "0 or a positive integer"),
    ("train.epochs", lambda v: v > 0, "a positive number"),
    ("train.lr", lambda v: v > 0, "a positive number"),
    ("train.log_every", lambda v: v > 0, "a positive integer"),
    ("train.eval_every", lambda v: v >= 0, "0 or a positive integer"),
    ("train.save_every", lambda v: v >= 0, "0 or a positive integer"),
    ("train.keep_last", lambda v: v >= 1, "at least 1 (the newest checkpoint is what a resume needs)"),
    ("train.device", lambda v: _DEVICE.match(v) is not None, "auto, cpu, cuda, cuda:N, mps or xpu[:N]"),
    ("train.warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)"),
    (
        "train.report_to",
        lambda v: set(v) <= {*TRACKERS, "none"} and not ("none" in v and len(v) > 1),
        f"a list of {', '.join(TRACKERS)}, or none",
    ),
    ("peft.r", lambda v: v > 0, "a positive integer"),
    ("peft.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("data.eval_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("generate.max_new_tokens", lambda v: v > 0, "a positive integer"),
    ("generate.temperature", lambda v: v > 0, "a positive number"),
    ("generate.top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("pipeline.task_slips", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("grpo.num_generations", lambda v: v >= 2, "at least 2 (groups need two answers to compare)"),
]


_DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def all_keys(cls=Config) -> list[str]:
    """Every dotted key of the schema, e.g. 'train.lr'."""
    return [f"{s}.{k}" for s, sf in _fields(cls).items() for k in _fields(sf.default_factory)]


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any, choices: tuple | None) -> Any:
    """Check `value` against the annotation `tp`; accept ints for floats and a scalar for a list."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        items = value if isinstance(value, (list, tuple)) else ([] if value in (None, "") else [value])
        return [_coerce(f"{key}[{i}]", v, item_tp, None) for i, v in enumerate(items)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping (got {value!r})")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(key, value, args[0], choices)
    if tp in (int, float) and isinstance(value, str):
        # YAML reads '3e-4' as a string; numbers written that way are still numbers
        try:
            value = tp(value)
        except ValueError:
            pass
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool))
        or tp is Any
    )
    if not ok:
        raise ConfigError(f"{key} must be {_type_name(tp)} (got {value!r})")
    value = float(value) if tp is float else str(value) if tp is str else value
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number (got {value!r})")
    if choices and value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))} (got {value!r})")
    return value


class _Raw(str):
    """An override value as typed on the command line, parsed once its field's type is known."""

    def parse(self, tp: Any) -> Any:
        import yaml

        if tp is str:
            return str(self)  # keep 'no', 'on', '1e-4' as written for string fields
        try:
            return yaml.safe_load(self) if self.strip() else ""
        except yaml.YAMLError:
            return str(self)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    return key.strip(), _Raw(raw)


def _flatten(tree: dict, where: str) -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}; sections must be mappings."""
    flat = {}
    for section, body in tree.items():
        if section not in _fields(Config):
            raise _unknown(str(section))
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping of keys")
        for k, v in body.items():
            flat[f"{section}.{k}"] = v
    return flat


def read_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: a config file must be a mapping of sections")
    return tree


def build_config(values: dict[str, Any]) -> Config:
    """A validated `Config` from flat dotted keys."""
    cfg = Config()
    for key, value in values.items():
        section, _, name = key.partition(".")
        if section not in _fields(Config) or name not in _fields(type(getattr(cfg, section))):
            raise _unknown(key)
        f = _fields(type(getattr(cfg, section)))[name]
        tp = typing.get_type_hints(type(getattr(cfg, section)))[name]
        if isinstance(value, _Raw):
            value = value.parse(tp)
        setattr(getattr(cfg, section), name, _coerce(key, value, tp, f.metadata.get("choices")))
    for key, ok, what in _RULES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            raise ConfigError(f"{key} must be {what} (got {value!r})")
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None) and apply `key=value` overrides."""
    values = _flatten(read_yaml(path), str(path)) if path else {}
    for item in overrides:
        key, value = _parse_override(item)
        values[key] = value
    return build_config(values)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_flat(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, body in to_dict(cfg).items() for k, v in body.items()}


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the effective config as YAML (the file `load_config` reads back to the same config)."""
    import yaml

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(sections: tuple[str, ...] | None = None) -> str:
    """Every key with its type, default and help line, for `chatforge STAGE --help`."""
    lines = []
    for section, sf in _fields(Config).items():
        if sections and section not in sections:
            continue
        cls = sf.default_factory
        hints = typing.get_type_hints(cls)
        lines.append(f"{section}:")
        for name, f in _fields(cls).items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            kind = "|".join(choices) if choices else _type_name(hints[name])
            lines.append(f"  {section}.{name} ({kind}, default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)
