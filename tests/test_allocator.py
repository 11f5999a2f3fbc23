"""The malloc choice: which library CHATFORGE_MALLOC selects and the one restart of the command."""

import os
import subprocess
import sys

import pytest

from chatforge import allocator
from chatforge.errors import ConfigError


def fake_libs(tmp_path, *names):
    for name in names:
        (tmp_path / allocator.KNOWN[name]).write_bytes(b"")
    return [str(tmp_path)]


def test_auto_takes_the_first_known_library_found(tmp_path):
    dirs = fake_libs(tmp_path, "mimalloc", "tcmalloc")
    assert allocator.choose("auto", dirs) == str(tmp_path / "libmimalloc.so.2")
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    assert allocator.choose("", dirs) == str(tmp_path / "libjemalloc.so.2")
    assert allocator.choose("auto", [str(tmp_path / "empty")]) is None


def test_named_system_and_path_settings(tmp_path):
    dirs = fake_libs(tmp_path, "jemalloc")
    assert allocator.choose("system", dirs) is None
    assert allocator.choose("jemalloc", dirs) == str(tmp_path / "libjemalloc.so.2")
    assert allocator.choose(str(tmp_path / "libjemalloc.so.2"), []) == str(tmp_path / "libjemalloc.so.2")
    with pytest.raises(ConfigError, match=r"CHATFORGE_MALLOC=mimalloc: libmimalloc.so.2 is not installed"):
        allocator.choose("mimalloc", dirs)
    with pytest.raises(ConfigError, match=r"CHATFORGE_MALLOC=/no/such.so: no such file"):
        allocator.choose("/no/such.so", dirs)


def test_restart_env_preloads_once(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    dirs = fake_libs(tmp_path, "jemalloc")
    lib = str(tmp_path / "libjemalloc.so.2")
    env = allocator.restart_env({"LD_PRELOAD": "/x/other.so", "HOME": "/h"}, dirs)
    assert env == {"LD_PRELOAD": f"{lib} /x/other.so", "HOME": "/h", allocator.MARK: "1"}
    assert allocator.restart_env(env, dirs) is None  # the restarted process goes on
    assert allocator.restart_env({"LD_PRELOAD": lib}, dirs) is None  # already preloaded by the user
    assert allocator.restart_env({allocator.ENV: "system"}, dirs) is None
    assert allocator.restart_env({}, [str(tmp_path / "empty")]) is None
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.restart_env({}, dirs) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD restart is Linux only")
def test_the_command_restarts_once_with_the_library_preloaded(tmp_path):
    # A real malloc when the machine has one, else any harmless shared library: the restart is the same.
    lib = allocator.choose("auto") or allocator.find_library("libm.so.6")
    assert lib is not None
    code = (
        "import os, sys\n"
        "from chatforge import allocator\n"
        "print('RUN', os.environ.get(allocator.MARK), os.environ.get('LD_PRELOAD'), allocator.in_use())\n"
        "sys.argv = ['chatforge', 'data', '--help']\n"
        "from chatforge.cli import main\n"
        "main()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.MARK)}

    def run(source: str) -> list[list[str]]:
        done = subprocess.run(
            [sys.executable, "-c", source], env={**env, allocator.ENV: lib}, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return [line.split() for line in done.stdout.splitlines() if line.startswith("RUN")]

    runs = run(code)
    assert runs[0][1:3] == ["None", "None"]
    assert runs[1][1:3] == ["1", lib]
    assert len(runs) == 2
    if "libm.so" not in lib:
        assert runs[1][3] in allocator.KNOWN  # the preloaded malloc is the one running
    # called from Python (not as the command), main never restarts
    assert len(run(code.replace("main()\n", "main(['data', '--help'])\n"))) == 1
