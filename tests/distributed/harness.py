"""Run a function on every rank of a real torch.distributed (gloo, CPU) process group.

Starting a process and importing torch takes seconds on a loaded 2-core machine, so
the ranks of a world size are started once and kept (a :class:`Pool`); each test sends
them a task, ``(module, function, kwargs)``, and collects one :class:`Outcome` per
rank. Everything has a deadline: a task that does not finish on every rank within
its timeout (a hang in a collective, a rank that raised while the others wait) kills
the pool's processes and fails the test with :class:`HangError`; the next task starts a
fresh pool. The process group itself has a collective timeout too, so a stuck rank
raises rather than waiting forever.

The group rendezvous through a ``FileStore`` in a private temporary directory: no
network port is opened beyond gloo's own loopback connections (``GLOO_SOCKET_IFNAME``
is set to ``lo``).

Results travel back as bytes written by ``torch.save`` (tensors keep their dtype and
values exactly; nothing goes through shared memory).
"""

from __future__ import annotations

import datetime
import importlib
import io
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_TIMEOUT = 90.0
"""Seconds a task may take on every rank before the pool is killed."""

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=45)
"""gloo's own timeout: a collective that waits this long raises on that rank."""

START_TIMEOUT = 120.0
"""Seconds the ranks may take to start and join the group (imports are slow under load)."""

ERROR_GRACE = 20.0
"""After one rank raised, how long the others get to finish (or raise) before a kill."""


class HangError(AssertionError):
    """A task did not finish on every rank in time; the pool was killed."""


@dataclass(frozen=True)
class Outcome:
    """What one rank's task returned or raised.

    Attributes:
        rank: the rank.
        value: the function's return value (None if it raised).
        error: the exception's type name, or None.
        message: ``str(exception)``.
        traceback: the formatted traceback.
    """

    rank: int
    value: Any = None
    error: str | None = None
    message: str = ""
    traceback: str = ""

    def unwrap(self) -> Any:
        """The value; an ``AssertionError`` carrying the rank's traceback if it raised."""
        if self.error is not None:
            raise AssertionError(f"rank {self.rank} raised {self.error}:\n{self.traceback}")
        return self.value


def _dumps(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank: int, world: int, store_path: str, tasks: Any, results: Any) -> None:
    """A rank's main loop: join the group, then run tasks until told to stop (None)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # 2 cores, several ranks: no oversubscription
    import torch.distributed as dist

    try:
        store = dist.FileStore(store_path, world)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
        )
    except BaseException as exc:  # report, so the parent need not wait for a timeout
        results.put(("start", rank, _dumps(_failure(rank, exc))))
        return
    results.put(("start", rank, _dumps(Outcome(rank, value="ready"))))
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            task_id, module, function, kwargs = task
            try:
                fn = getattr(importlib.import_module(module), function)
                outcome = Outcome(rank, value=fn(**kwargs))
            except BaseException as exc:
                outcome = _failure(rank, exc)
            results.put((task_id, rank, _dumps(outcome)))
    finally:
        dist.destroy_process_group()
    # FSDP2 and DTensors keep the group alive past destroy_process_group(), and a gloo
    # worker thread still alive when the interpreter finalizes can abort the process
    # (pytorch/pytorch#179291): send what is queued, then end without finalization.
    results.close()
    results.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _failure(rank: int, exc: BaseException) -> Outcome:
    return Outcome(
        rank,
        error=type(exc).__name__,
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
    )


class Pool:
    """``world`` ranks of a gloo process group, started once, running tasks on demand."""

    def __init__(self, world: int) -> None:
        self.world = world
        self._ctx = mp.get_context("spawn")
        self._procs: list[Any] = []
        self._tasks: list[Any] = []
        self._results: Any = None
        self._dir: str | None = None
        self._next_id = 0

    @property
    def alive(self) -> bool:
        """Whether the ranks are running."""
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def _start(self) -> None:
        self.close()
        self._dir = tempfile.mkdtemp(prefix=f"gradclip-dist{self.world}-")
        store_path = os.path.join(self._dir, "store")
        self._results = self._ctx.Queue()
        self._tasks = [self._ctx.Queue() for _ in range(self.world)]
        self._procs = [
            self._ctx.Process(
                target=_worker,
                args=(rank, self.world, store_path, self._tasks[rank], self._results),
                daemon=True,
            )
            for rank in range(self.world)
        ]
        for proc in self._procs:
            proc.start()
        outcomes = self._collect("start", START_TIMEOUT, grace=START_TIMEOUT)
        failed = [o for o in outcomes if o.error is not None]
        if failed:
            self.kill()
            raise AssertionError(f"rank {failed[0].rank} could not start:\n{failed[0].traceback}")

    def run(
        self, module: str, function: str, *, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any
    ) -> list[Outcome]:
        """Call ``module.function(**kwargs)`` on every rank; one :class:`Outcome` per rank.

        Raises:
            HangError: some rank did not finish within ``timeout`` seconds (or within
                :data:`ERROR_GRACE` of another rank raising); the pool is killed.
        """
        if not self.alive:
            self._start()
        self._next_id += 1
        task_id = self._next_id
        for q in self._tasks:
            q.put((task_id, module, function, kwargs))
        return self._collect(task_id, timeout, grace=ERROR_GRACE)

    def _collect(self, task_id: object, timeout: float, *, grace: float) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        start = time.monotonic()
        deadline = start + timeout
        while len(outcomes) < self.world:
            left = deadline - time.monotonic()
            if left <= 0 or (not self.alive and self._results.empty()):
                self.kill()
                missing = sorted(set(range(self.world)) - set(outcomes))
                errors = "".join(
                    f"\nrank {o.rank} raised {o.error}:\n{o.traceback}"
                    for o in outcomes.values()
                    if o.error is not None
                )
                raise HangError(
                    f"ranks {missing} of {self.world} did not finish task {task_id!r} "
                    f"after {time.monotonic() - start:.0f} s (pool killed){errors}"
                )
            try:
                got_id, rank, data = self._results.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if got_id != task_id:
                continue  # a late answer to a task that already failed
            outcome: Outcome = _loads(data)
            outcomes[rank] = outcome
            if outcome.error is not None:
                deadline = min(deadline, time.monotonic() + grace)
        return [outcomes[r] for r in range(self.world)]

    def kill(self) -> None:
        """Stop the ranks now (the processes this pool started, by handle)."""
        started = [proc for proc in self._procs if proc.pid is not None]
        for proc in started:
            if proc.is_alive():
                proc.kill()
        for proc in started:
            proc.join(timeout=10)
        self._procs = []
        self._cleanup()

    def close(self) -> None:
        """Ask the ranks to leave the group and exit; kill any that do not."""
        if self._procs and self.alive:
            for q in self._tasks:
                q.put(None)
            for proc in self._procs:
                proc.join(timeout=15)
        self.kill()

    def _cleanup(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def values(outcomes: list[Outcome]) -> list[Any]:
    """Every rank's value, failing with the first rank's traceback if any raised."""
    return [o.unwrap() for o in outcomes]
