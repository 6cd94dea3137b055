"""Launching ``torchrun`` from tests, with one known torch teardown crash retried.

With torch 2.13 a gloo rank sometimes aborts *at interpreter exit*, after its work
and ``destroy_process_group()`` are done, printing "terminate called without an
active exception" (a joinable C++ thread destroyed during teardown; see
pytorch/pytorch#190489 and #179291). The programs under test already close their
groups behind a barrier, which makes it rare; a run that fails with exactly that
signature is run again (at most :data:`ATTEMPTS` times). Any other failure, and the
output checks of the tests, are unaffected.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

import pytest

TEARDOWN_ABORT = "terminate called without an active exception"
ATTEMPTS = 3


def run(
    command: Sequence[str], *, env: Mapping[str, str], timeout: float, cwd: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (a torchrun launch) to completion; fail the test on a timeout."""
    for _ in range(ATTEMPTS):
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
            proc.communicate()
            pytest.fail(f"{' '.join(command)} did not finish within {timeout} s")
        done = subprocess.CompletedProcess(list(command), proc.returncode, out, err)
        if proc.returncode == 0 or TEARDOWN_ABORT not in err:
            return done
    return done
