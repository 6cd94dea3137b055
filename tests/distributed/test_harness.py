"""The harness turns a hang into a failure within its timeout, and reports errors per rank."""

from __future__ import annotations

import time

import pytest

from .harness import HangError, Pool

pytestmark = pytest.mark.distributed


def test_a_hang_fails_within_the_timeout_and_kills_the_ranks() -> None:
    pool = Pool(2)  # its own pool: this test kills it
    try:
        assert [o.value for o in pool.run(f"{__package__}.scenarios", "fail_on", bad_rank=-1)] == [
            0,
            1,
        ]
        outcomes = pool.run(f"{__package__}.scenarios", "fail_on", bad_rank=1)
        assert outcomes[0].value == 0 and outcomes[0].error is None
        assert outcomes[1].error == "ValueError" and "on purpose" in outcomes[1].message
        start = time.monotonic()
        with pytest.raises(HangError, match=r"ranks \[0\] of 2 did not finish"):
            pool.run(f"{__package__}.scenarios", "wait_alone", timeout=3.0)
        assert time.monotonic() - start < 20
        assert not pool.alive
    finally:
        pool.close()
