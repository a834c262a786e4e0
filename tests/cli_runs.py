"""Running the `clipreel` command from tests: through its entry point in this process, or as a user
runs it, in a new process that imports this checkout. (tests/ is on sys.path: pytest puts the
folder of tests/conftest.py there.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def run_in_this_process(*args) -> int:
    """`clipreel ARGS...` through its entry point (`clipreel.cli.main`: a ClipreelError prints one
    message and exits 2) in this process; returns the exit code. Output goes where it would go."""
    from clipreel.cli import main

    saved_argv = sys.argv
    sys.argv = ["clipreel", *(str(arg) for arg in args)]
    try:
        main()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        sys.argv = saved_argv
    return 0


def checkout_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with this checkout first on PYTHONPATH, so that a
    new Python process imports the clipreel under test."""
    environment = dict(os.environ if base is None else base)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), environment.get("PYTHONPATH")]))
    return environment


def clipreel_command(*args) -> list[str]:
    """The argv of `clipreel ARGS...` run by this Python (`python -m clipreel`)."""
    return [sys.executable, "-m", "clipreel", *(str(arg) for arg in args)]


def run_in_new_process(*args, environment: dict[str, str] | None = None,
                       timeout: float = 600) -> subprocess.CompletedProcess:
    """`clipreel ARGS...` in a new process (nothing imported or registered in it beforehand), its
    output captured as text; `environment` defaults to this process's, with this checkout."""
    return subprocess.run(clipreel_command(*args), env=environment or checkout_environment(),
                          capture_output=True, text=True, timeout=timeout)
