"""Launching ``torchrun`` from tests: one deadline, and the whole launch ended on expiry.

Nothing is run again. The programs under test end their ranks so that no gloo group
is alive when the interpreter finalizes (see ``examples/``); a rank that still aborts
there, printing :data:`TEARDOWN_ABORT` (a gloo worker taking the GIL during
finalization, pytorch/pytorch#179291), fails its test with a message that says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

import pytest

TEARDOWN_ABORT = "terminate called without an active exception"


def run(
    command: Sequence[str], *, env: Mapping[str, str], timeout: float, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (a torchrun launch) to completion; fail the test on a timeout."""
    proc = subprocess.Popen(
        list(command),
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so a timeout can end all of it
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"{' '.join(command)} did not finish within {timeout} s\n{out[-2000:]}\n{err[-4000:]}"
        )
    return subprocess.CompletedProcess(list(command), proc.returncode, out, err)


def failure(proc: subprocess.CompletedProcess[str]) -> str:
    """What to show when a launch failed: the cause if known, and the end of its output."""
    cause = ""
    if TEARDOWN_ABORT in proc.stderr:
        cause = (
            "a rank aborted at interpreter exit with a gloo group still alive "
            "(pytorch/pytorch#179291): the program must release its group or end "
            "with os._exit after destroy_process_group()\n"
        )
    return f"exit status {proc.returncode}\n{cause}{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
