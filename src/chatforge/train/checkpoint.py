"""Checkpoint files that never lose work and never run code.

- `checkpoints/step-N/` dirs are ordered by the number N (never as strings: step-10 is newer than
  step-6), and pruning keeps the newest `keep_last >= 1`.
- Everything a resume reads is a safetensors file, JSON, or a `torch.save` file that
  `torch.load(weights_only=True)` accepts (tensors and plain Python values only): a crafted pickle
  in a checkpoint is refused with a one-line error and nothing in it runs.
- A dir is written under a temp name and renamed into place; `final/` is replaced by moving the old
  one aside, the new one in, then deleting the old one, so a kill at any moment leaves a `final/`
  (or its previous version, which `recover_dir` puts back).
- A failed write (a full disk, a read-only file system) removes its temp dir and raises one line
  that names the path and says why; the earlier checkpoints are untouched.
- A run's identity (`identity`: the config keys that change what is trained) is written into each
  checkpoint, so a resume can refuse a checkpoint of another run and name the keys that differ.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chatforge.errors import ChatforgeError

_STEP_DIR = re.compile(r"^step-(\d+)$")

# Keys that change how a run is watched or where it is written, not what it trains.
OPERATIONAL = {
    "train.output_dir",
    "train.resume",
    "train.overwrite",
    "train.progress",
    "train.report_to",
    "train.project",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_last",
    "train.device",
    "data.eval",
    "ppo.samples_every",
    "ppo.forward_batch_size",
    "grpo.samples_every",
}
_LOW_DISK = 64 << 20  # bytes free below which a failed write is reported as a full disk


def step_of(path: Path) -> int | None:
    """The step number of a `step-N` dir name, else None.

    >>> step_of(Path("ckpt/step-10")), step_of(Path("step-x")), step_of(Path(".tmp-step-3"))
    (10, None, None)
    """
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoints (a `state.json` inside) under `root`, oldest first by step number."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if step_of(p) is not None and (p / "state.json").is_file()]
    return sorted(found, key=step_of)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` (at least one) checkpoints."""
    for old in step_dirs(root)[: -max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def identity(flat_config: dict[str, Any]) -> dict[str, Any]:
    """The config keys that make a run what it is (everything but OPERATIONAL and pipeline.*)."""
    return {
        k: v for k, v in sorted(flat_config.items()) if k not in OPERATIONAL and not k.startswith("pipeline.")
    }


def differences(saved: dict[str, Any], current: dict[str, Any], limit: int = 4) -> list[str]:
    """'key (checkpoint X, now Y)' for each identity key whose value changed.

    >>> differences({"train.lr": 1e-4, "peft.r": 8}, {"train.lr": 2e-4, "peft.r": 8})
    ['train.lr (checkpoint 0.0001, now 0.0002)']
    """
    keys = sorted(set(saved) | set(current))
    changed = [k for k in keys if saved.get(k) != current.get(k)]
    shown = [f"{k} (checkpoint {saved.get(k)!r}, now {current.get(k)!r})" for k in changed[:limit]]
    if len(changed) > limit:
        shown.append(f"{len(changed) - limit} more")
    return shown


def save_plain(obj: Any, path: Path) -> None:
    """`torch.save` of tensors and plain Python values only: what `load_plain` accepts."""
    import torch

    torch.save(obj, path)


def load_plain(path: Path) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain values only; a pickle that would build
    any other object (and so could run code) is refused with a one-line error."""
    import pickle

    import torch

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise ChatforgeError(
            f"{path}: holds Python objects other than tensors and plain values; refusing to unpickle "
            "it (a checkpoint file can run code): was it written by something other than chatforge?"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ChatforgeError(f"{path}: unreadable checkpoint file ({_first_line(e)})") from None


def read_state(path: Path) -> dict:
    """`state.json` of a checkpoint dir."""
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise ChatforgeError(
            f"{path / 'state.json'}: unreadable checkpoint state ({_first_line(e)})"
        ) from None


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished dir `tmp` to `final`, replacing any old one without a moment when neither
    exists: old -> aside, tmp -> final, then delete aside."""
    aside = final.with_name(f".old-{final.name}")
    shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        final.rename(aside)
    tmp.rename(final)
    shutil.rmtree(aside, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Put back the previous version of `final` if a kill came between the two renames."""
    aside = final.with_name(f".old-{final.name}")
    if aside.is_dir() and not final.exists():
        aside.rename(final)


@contextlib.contextmanager
def writing(path: Path, what: str, temporary: bool = True) -> Iterator[None]:
    """Around writes at `path`: on failure delete it when it is a `temporary` dir, and raise one
    line naming it and why."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if temporary:
            shutil.rmtree(path, ignore_errors=True)
        reason = write_failure(e, path)
        if reason is None:
            raise
        raise ChatforgeError(f"{path}: could not write {what}: {reason}") from None


def write_failure(e: BaseException, path: Path) -> str | None:
    """Why writing at `path` failed, in words; None when `e` is not a write failure (a bug)."""
    code = getattr(e, "errno", None)
    text = str(e)
    if code == errno.ENOSPC or "No space left" in text or _free_bytes(path) < _LOW_DISK:
        return (
            "the disk is full; free some space (earlier checkpoints are intact, train.resume=true continues)"
        )
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "the location is not writable (read-only file system or no permission)"
    if isinstance(e, OSError):
        return _first_line(e)
    if "file write failed" in text or "inline_container" in text:
        return f"the file write failed ({_first_line(e)})"
    return None


def _free_bytes(path: Path) -> int:
    for p in [path, *path.parents]:
        with contextlib.suppress(OSError):
            return shutil.disk_usage(p).free
    return 1 << 62


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0].strip() if lines else type(e).__name__


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The JSON records of a log file and how many lines were dropped as unreadable (a torn last
    line from a killed process)."""
    records, dropped = [], 0
    if not path.is_file():
        return records, dropped
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            dropped += 1
    return records, dropped


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states, as tensors and plain values (`save_plain`)."""
    import random

    import numpy as np
    import torch

    # tensors and plain values only, so that a resume can load it with weights_only=True
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def truncate_log(path: Path, step: int) -> None:
    """Drop records logged after `step` by a run that died before its next checkpoint, and any torn
    line a kill left (reported)."""
    if not path.is_file():
        return
    records, dropped = read_jsonl(path)
    if dropped and int(os.environ.get("RANK", "0")) == 0:
        print(f"chatforge: {path}: dropped {dropped} unreadable line(s) (a run killed mid-write)", flush=True)
    keep = [r for r in records if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))
