"""Which malloc a chatforge process runs on (Linux).

glibc's malloc keeps what a training step frees in per-thread arenas, cut up by the thousands of
1-3 MB tensors a step allocates and frees, so a CPU process's resident memory grows to about twice
what it ever holds live. jemalloc, mimalloc and tcmalloc keep far less. Measured on a 2-core CPU
(SmolLM2-135M reward model, LoRA, gradient checkpointing): peak RSS 0.99 GiB on glibc, 0.83 GiB on
jemalloc or mimalloc, and no slower steps (docs/benchmarks.md has the full tables).

So the `chatforge` command restarts itself once, at start-up and before torch is imported, with
such a library in LD_PRELOAD when the environment's lib dir or the system has one (`make install`
fetches jemalloc into the venv on Debian/Ubuntu; `apt install libjemalloc2` installs it system-wide).
`CHATFORGE_MALLOC` chooses:

    auto      (default) the first of jemalloc, mimalloc, tcmalloc found; glibc's when none is
    system    glibc's malloc, no restart
    NAME      jemalloc, mimalloc or tcmalloc: that one (an error when it is not installed)
    PATH      a malloc library file to preload

The restart happens only for the `chatforge` command itself; `chatforge.cli.main([...])` called from
Python and every library function keep the process as it is.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from chatforge.errors import ConfigError

ENV = "CHATFORGE_MALLOC"
MARK = "_CHATFORGE_MALLOC_DONE"  # set in the restarted process: never restart twice
KNOWN = {  # name -> shared library, in the order `auto` tries them
    "jemalloc": "libjemalloc.so.2",
    "mimalloc": "libmimalloc.so.2",
    "tcmalloc": "libtcmalloc_minimal.so.4",
}


def library_dirs() -> list[str]:
    """Where malloc libraries are looked for: the Python environment's lib, then the system's."""
    dirs = [os.path.join(sys.prefix, "lib"), "/usr/local/lib"]
    dirs += sorted(glob.glob("/usr/lib/*-linux-gnu")) + ["/usr/lib64", "/usr/lib", "/lib64", "/lib"]
    return dirs


def find_library(filename: str, dirs: list[str] | None = None) -> str | None:
    """The path of `filename` in the first of `dirs` that has it."""
    for d in library_dirs() if dirs is None else dirs:
        path = os.path.join(d, filename)
        if os.path.isfile(path):
            return path
    return None


def choose(setting: str, dirs: list[str] | None = None) -> str | None:
    """The library a `CHATFORGE_MALLOC` setting selects (a path), or None for glibc's malloc."""
    setting = setting.strip() or "auto"
    if setting == "system":
        return None
    if setting == "auto":
        return next((p for lib in KNOWN.values() if (p := find_library(lib, dirs))), None)
    if setting in KNOWN:
        path = find_library(KNOWN[setting], dirs)
        if path is None:
            raise ConfigError(
                f"{ENV}={setting}: {KNOWN[setting]} is not installed (e.g. apt install lib{setting}2), "
                f"or set {ENV}=system"
            )
        return path
    if not Path(setting).is_file():
        raise ConfigError(
            f"{ENV}={setting}: no such file (expected auto, system, {', '.join(KNOWN)} or a library path)"
        )
    return str(Path(setting).resolve())


def restart_env(env: Mapping[str, str], dirs: list[str] | None = None) -> dict[str, str] | None:
    """The environment to restart the process with, or None to go on as it is."""
    if not sys.platform.startswith("linux") or env.get(MARK):
        return None
    lib = choose(env.get(ENV, "auto"), dirs)
    preload = env.get("LD_PRELOAD", "")
    if lib is None or lib in preload.replace(":", " ").split():
        return None
    return {**env, "LD_PRELOAD": f"{lib} {preload}".strip(), MARK: "1"}


def restart_with_chosen_malloc() -> None:
    """Replace this process by itself with the chosen malloc preloaded (returns when none applies)."""
    env = restart_env(os.environ)
    if env is None or in_use() != "system":  # none to load, or one is loaded already
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def in_use() -> str:
    """The malloc this process runs on: 'jemalloc', 'mimalloc', 'tcmalloc' or 'system'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return next((name for name in KNOWN if f"lib{name}" in maps), "system")


def describe() -> str:
    """One start-up line: the malloc in use and how to change it."""
    name = in_use()
    if name != "system":
        return f"malloc: {name} ({ENV}=system for glibc's)"
    if not sys.platform.startswith("linux") or os.environ.get(ENV, "").strip() == "system":
        return "malloc: the system's"
    return "malloc: glibc's; a CPU run holds less memory with jemalloc (make malloc, or apt install libjemalloc2)"
