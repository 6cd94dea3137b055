"""``GradMonitor``: per-step gradient norms, per layer, without a host sync per step.

The monitor records, for every training step: the pre- and post-clip total norm,
the threshold, the scale, whether anything was clipped, how many parameters had a
non-finite gradient norm, the loss and learning rate if given, and the norm of each
parameter's and each module's gradient.

**Data path.** With the :class:`~gradclip.clippers.stats.ClipStats` of a clipper,
the monitor reuses the per-tensor norms the clipper already computed (no second
pass over the gradients); alone, it computes them with one fused
:func:`gradclip.tensor_norms` call. Each step writes one row of a preallocated
``(log_every, columns)`` tensor on the gradients' device with a couple of tensor
ops: no ``.item()``, no host sync. Every ``log_every`` steps (and on ``flush()``,
``summary()``, ``close()`` and leaving a ``with`` block) the filled rows are moved
to the host in one transfer, per-module norms and non-finite counts are derived
from the per-parameter norms on the device just before it, spike detection runs on
the host values, and the rows go to the writers.

**Matching norms to parameters.** ``stats.norms[i]`` is the norm of
``stats.params[i]``. The monitor matches them to its own parameters by identity;
the index for a given ``stats.params`` is computed once and cached on the device.
A monitored parameter with no gradient this step, or one the clipper does not
clip, gets **NaN** in its ``param/`` column (distinguishable from a zero
gradient), counts as absent in its modules, and is not counted as non-finite.

**Modules** (``modules=``):

* ``"leaf"`` (default): every module that directly owns a monitored parameter
  (for most models, the layers: ``Linear``, ``LayerNorm``, ``Embedding``, ``LSTM``),
  except the root module, whose norm is the total norm.
* an int ``d``: each parameter's owning module cut to its first ``d`` name
  components (``d = 2`` on GPT-2 gives ``h.0`` ... ``h.11``, ``wte``, ``wpe``,
  ``ln_f``).
* a list of module names (``""`` is the root).
* ``None``: no module columns.

Whatever the choice, a module's norm covers every monitored parameter beneath it,
nested modules included: ``(Σ ‖g_i‖^p)^(1/p)`` over them (``max`` for ``p = inf``),
computed at flush for the whole block as a product with the fixed 0/1
parameter-module matrix (stored as index pairs on the device); NaN if none of them
had a gradient, NaN/inf if one of them had a NaN/inf norm.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

from gradclip._params import check_norm_type
from gradclip.clippers.stats import ClipStats
from gradclip.history import History, Summary
from gradclip.norms import tensor_norms, total_norm_of
from gradclip.spikes import SpikeDetector, SpikeEvent
from gradclip.writers import (
    BASE_COLUMNS,
    MODULE_PREFIX,
    PARAM_PREFIX,
    LogBlock,
    Value,
    Writer,
    as_writer,
)

__all__ = ["GradMonitor"]

# Device row layout: these scalars, then one norm per monitored parameter (-1: absent).
_DEVICE_SCALARS = ("total_norm", "clipped_norm", "threshold", "scale", "clipped", "loss", "lr")
_K = len(_DEVICE_SCALARS)
_ABSENT = -1.0  # norms are >= 0 or NaN, so -1 marks "no gradient" unambiguously
_CACHE_SIZE = 16

ModulesArg = str | int | Sequence[str] | None
WriterLike = Writer | Callable[[dict[str, Value]], object]
ModelOrParams = torch.nn.Module | Tensor | Iterable[Tensor] | Iterable[tuple[str, Tensor]]


class GradMonitor:
    """Record gradient norms every step; log them every ``log_every`` steps.

    Args:
        model_or_named_parameters: an ``nn.Module`` (its parameters that require
            gradients, with their names), ``named_parameters()`` pairs, or tensors
            (named ``params[i]``).
        log_every: steps between flushes to the host and the writers (>= 1); also
            the number of rows of the on-device buffer.
        per_layer: write the ``param/`` and ``module/`` columns (they are recorded
            either way; the non-finite count is derived from them). A bool.
        writers: :class:`~gradclip.writers.Writer` instances or plain callables
            (called with each step's record as a dict); a list of them, or one.
        modules: which modules get a ``module/`` column: ``"leaf"``, a depth, a list
            of names, or None (see the module docstring).
        norm_type: the p of the norms when computing them (no ``stats``) and of the
            module aggregation; set it to the clipper's.
        spike_window: values in the rolling window of the spike detectors (>= 3).
        spike_threshold: robust z-score above which a value is a spike (see
            :mod:`gradclip.spikes`; the total norm is scored on a log scale, the
            loss on a log scale while it is positive). Detection runs on the host at
            flush time and costs nothing per step.
        spike_min_history: how many finite values each detector must have seen
            before it scores one: the values before are never scored nor flagged
            (their ``norm_score``/``loss_score`` is NaN). An int in
            ``[3, spike_window]``; None (default): ``min(20, spike_window)``. Lower it
            to catch spikes early in a short run, at the price of a scale estimated
            from fewer values.
        spike_rel_floor: the smallest scale a score divides by (> 0, finite), so a
            flat stretch does not turn float noise into spikes. On the log scale (the
            norm, and the loss while positive) it is a relative change: with the
            default 0.01 and ``spike_threshold`` 6, a value more than
            ``exp(0.06) - 1`` (about 6%) above a flat window is a spike; 0.05 asks for
            ``exp(0.3) - 1`` (35%). On the raw scale it is relative to ``|median|``.

    Attributes:
        names: the monitored parameters' names, in column order.
        module_names: the reported modules, in column order (``""``: the root).
        columns: the log's columns (see :mod:`gradclip.writers`).
        step: steps observed so far; the ``step`` column of the next step is
            ``step + 1``. Set it when resuming a run.
        history: the flushed steps' scalars, behind :meth:`summary`.

    Raises:
        ValueError: no parameters, a bad ``log_every``, an unknown module name, a
            spike option out of its range.
        TypeError: a writer that is neither a Writer nor callable (a path among them:
            wrap it in a ``CSVWriter`` or ``JSONLWriter``), a non-bool ``per_layer``.

    Steps still in the buffer reach the writers at the next flush: call
    :meth:`close` at the end (or use the monitor as a context manager), or they are
    lost with the process.

    Example:
        >>> from gradclip.clippers.fixed import NormClip
        >>> nn = torch.nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> clipper = NormClip(model.parameters(), max_norm=1.0)
        >>> records = []
        >>> with GradMonitor(model, log_every=2, writers=[records.append]) as monitor:
        ...     for step in range(3):
        ...         loss = model(torch.randn(16, 4)).pow(2).mean()
        ...         loss.backward()
        ...         monitor.observe(clipper.clip_(), loss=loss, lr=0.1)
        ...         model.zero_grad()
        >>> [r["step"] for r in records]
        [1, 2, 3]
        >>> sorted(k for k in records[0] if k.startswith("module/"))
        ['module/0', 'module/2']
        >>> monitor.summary().steps
        3
    """

    def __init__(
        self,
        model_or_named_parameters: ModelOrParams,
        *,
        log_every: int = 50,
        per_layer: bool = True,
        writers: WriterLike | Iterable[WriterLike] = (),
        modules: ModulesArg = "leaf",
        norm_type: float = 2.0,
        spike_window: int = 100,
        spike_threshold: float = 6.0,
        spike_min_history: int | None = None,
        spike_rel_floor: float = 0.01,
    ) -> None:
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be an int >= 1; got {log_every!r}")
        if not isinstance(per_layer, bool):
            raise TypeError(f"per_layer must be True or False; got {per_layer!r}")
        named = _named_parameters(model_or_named_parameters)
        if not named:
            raise ValueError(
                "GradMonitor got no parameters to monitor (none require gradients, or an "
                "exhausted model.parameters() generator?)"
            )
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.log_every = log_every
        self.per_layer = per_layer
        self.norm_type = check_norm_type(norm_type)
        self.writers = _writers(writers)
        self.module_names, self._membership = _modules(self.names, modules)
        columns = list(BASE_COLUMNS)
        if self.per_layer:
            columns += [PARAM_PREFIX + n for n in self.names]
            columns += [MODULE_PREFIX + (m or "(root)") for m in self.module_names]
        self.columns: tuple[str, ...] = tuple(columns)
        self.step = 0
        self.history = History()
        history_needed = _spike_min_history(spike_min_history, spike_window)
        rel_floor = _spike_rel_floor(spike_rel_floor)
        self._norm_spikes = SpikeDetector(
            "total_norm", window=spike_window, threshold=spike_threshold,
            min_history=history_needed, log=True, rel_floor=rel_floor,
        )  # fmt: skip
        self._loss_spikes = SpikeDetector(
            "loss", window=spike_window, threshold=spike_threshold,
            min_history=history_needed, log="auto", rel_floor=rel_floor,
        )  # fmt: skip
        self._position = {id(p): i for i, p in enumerate(self.params)}
        self._buffer: Tensor | None = None
        self._consts: dict[str, Tensor] = {}
        self._matrix: Tensor | None = None
        self._rows = 0
        self._steps: list[int] = []
        self._host: list[tuple[float | None, float | None]] = []
        self._cache: dict[tuple[object, ...], _Match] = {}
        self._last: _Match | None = None
        self.closed = False

    # -- per step (no host sync) ---------------------------------------------------

    def observe(
        self,
        stats: ClipStats | None = None,
        *,
        loss: Tensor | float | numbers.Real | None = None,
        lr: float | numbers.Real | Tensor | None = None,
    ) -> None:
        """Record this step. Call once per step, after clipping (or instead of it).

        Args:
            stats: what the clipper returned; its norms are reused. None: compute
                the norms of the monitored gradients (one fused pass), as if nothing
                were clipped.
            loss: this step's loss: a one-element tensor (recorded without a host
                sync) or a real number (Python or NumPy).
            lr: the learning rate, likewise.

        Raises:
            RuntimeError: the monitor was closed.
            TypeError: ``stats`` is not a ``ClipStats``, or ``loss``/``lr`` is neither
                a number nor a tensor.
            ValueError: ``stats.norms`` and ``stats.params`` disagree in length, or
                ``loss`` has more than one element.
        """
        if self.closed:
            raise RuntimeError("GradMonitor.observe() after close()")
        if stats is None:
            total, norms, match = self._measure()
        else:
            if not isinstance(stats, ClipStats):
                raise TypeError(
                    "stats must be the ClipStats a clipper's clip_() returned, or None; "
                    f"got {type(stats).__name__} {stats!r:.60}"
                )
            if stats.norms.numel() != len(stats.params):
                raise ValueError(
                    f"stats has {stats.norms.numel()} norms but {len(stats.params)} params; "
                    "the monitor matches norms to parameters through stats.params"
                )
            total, norms = stats.total_norm, stats.norms
            match = self._match(stats.params, norms.device)
        like = norms if norms.numel() else (self._buffer if self._buffer is not None else total)
        row = self._next_row(like)
        c = self._consts
        if stats is None:
            scalars = [total, total, c["inf"], c["one"], c["zero"]]
        else:
            scalars = [total, stats.clipped_norm, stats.threshold, stats.scale, stats.clipped]
        if total.device != row.device:  # no gradients this step: stats made on the CPU
            scalars = [s.to(row.device) for s in scalars]
        loss_t, host_loss = _as_value(loss, c["nan"], "loss")
        lr_t, host_lr = _as_value(lr, c["nan"], "lr")
        torch.stack([*scalars, loss_t, lr_t], out=row[:_K])
        match.write(norms, row[_K:])
        self.step += 1
        self._steps.append(self.step)
        self._host.append((host_loss, host_lr))
        self._rows += 1
        if self._rows == self.log_every:
            self.flush()

    def _measure(self) -> tuple[Tensor, Tensor, _Match]:
        """The total norm and per-tensor norms of the monitored gradients (one fused pass)."""
        grads: list[Tensor] = []
        present: list[int] = []
        for i, p in enumerate(self.params):
            if p.grad is not None:
                grads.append(p.grad)
                present.append(i)
        if not grads:
            device = self._buffer.device if self._buffer is not None else torch.device("cpu")
            return torch.zeros((), device=device), torch.zeros(0, device=device), _ALL_ABSENT
        with torch.no_grad():  # gradients of a create_graph=True backward require grad
            norms = tensor_norms(grads, self.norm_type)
            total = total_norm_of(norms, self.norm_type)
        if len(present) == len(self.params):
            return total, norms, _IDENTITY
        key = ("grads", *present)
        match = self._cache.get(key)
        if match is None:
            index = [-1] * len(self.params)
            for k, i in enumerate(present):
                index[i] = k
            match = _Match.build(index, norms.device)
            self._remember(key, match)
        return total, norms, match

    def _match(self, params: tuple[Tensor, ...], device: torch.device) -> _Match:
        last = self._last
        if (
            last is not None
            and len(params) == len(last.keep)
            and all(map(operator.is_, params, last.keep))
        ):
            return last  # the usual case: the same parameters as the step before
        key: tuple[object, ...] = tuple(map(id, params))
        match = self._cache.get(key)
        if match is not None:
            self._last = match
            return match
        index = [-1] * len(self.params)
        for k, p in enumerate(params):
            i = self._position.get(id(p))
            if i is not None:
                index[i] = k
        identity = index == list(range(len(params)))
        match = _IDENTITY if identity else _Match.build(index, device)
        match = match.keeping(params)  # holds the tensors, so their ids stay unique
        self._remember(key, match)
        self._last = match
        return match

    def _remember(self, key: tuple[object, ...], match: _Match) -> None:
        if len(self._cache) >= _CACHE_SIZE:  # many different parameter sets: forget the oldest
            del self._cache[next(iter(self._cache))]
        self._cache[key] = match

    def _next_row(self, like: Tensor) -> Tensor:
        buffer = self._buffer
        if buffer is None or buffer.device != like.device:
            if buffer is not None and self._rows:
                self.flush()
            dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
            width = _K + len(self.params)
            buffer = torch.empty((self.log_every, width), dtype=dtype, device=like.device)
            self._buffer = buffer
            self._matrix = None
            values = {"nan": math.nan, "inf": math.inf, "one": 1.0, "zero": 0.0}
            self._consts = {
                k: torch.tensor(v, dtype=dtype, device=like.device) for k, v in values.items()
            }
        return buffer[self._rows]

    # -- at the logging interval (one transfer) ----------------------------------

    @torch.no_grad()
    def flush(self) -> None:
        """Move the recorded steps to the host in one transfer and hand them to the writers.

        Every writer gets the block, even when one of them raises; the first error is
        raised after all of them ran, with a note naming its writer. The steps are
        flushed either way (in the history, and not handed out again).
        """
        n = self._rows
        if n == 0 or self._buffer is None:
            return
        block = self._buffer[:n]
        norms = block[:, _K:]
        absent = norms < 0
        nonfinite = (~torch.isfinite(norms)).sum(1, keepdim=True).to(block.dtype)
        parts = [block[:, :_K], nonfinite]
        if self.per_layer:
            parts.append(norms.masked_fill(absent, math.nan))
            if self.module_names:
                parts.append(self._aggregate(norms))
        host = torch.cat(parts, 1).cpu().tolist()
        steps, extras = self._steps, self._host
        self._rows, self._steps, self._host = 0, [], []
        self._emit(steps, extras, host, None if block.dtype == torch.float64 else 9)

    def _emit(
        self,
        steps: list[int],
        extras: list[tuple[float | None, float | None]],
        host: list[list[float]],
        float_digits: int | None,
    ) -> None:
        total = [r[0] for r in host]
        losses = [r[5] if loss is None else loss for r, (loss, _) in zip(host, extras)]
        lrs = [r[6] if lr is None else lr for r, (_, lr) in zip(host, extras)]
        norm_scores, norm_events = self._norm_spikes.update(steps, total)
        loss_scores, loss_events = self._loss_spikes.update(steps, losses)
        spiked = {(e.step, e.metric) for e in norm_events + loss_events}
        rows: list[list[Value]] = []
        for i, (step, r) in enumerate(zip(steps, host)):
            head: list[Value] = [
                step, r[0], r[1], r[2], r[3], int(r[4]), int(r[_K]), losses[i], lrs[i],
                norm_scores[i], loss_scores[i],
                int((step, "total_norm") in spiked), int((step, "loss") in spiked),
            ]  # fmt: skip
            rows.append(head + r[_K + 1 :] if self.per_layer else head)
        events = tuple(sorted(norm_events + loss_events, key=lambda e: (e.step, e.metric)))
        self.history.extend(
            steps, total, clipped=[r[4] for r in host], nonfinite=[r[_K] for r in host],
            spikes=events,
        )  # fmt: skip
        block = LogBlock(self.columns, rows, events, float_digits)
        _call_each(self.writers, "write", block)

    def _aggregate(self, norms: Tensor) -> Tensor:
        """Per-module norms of a block of per-parameter norms (``(rows, params)``).

        The 0/1 membership matrix is stored sparsely, as (parameter, module) index
        pairs on the device, so the product is one gather and one ``index_add``. It
        runs in the norms' dtype, like the total norm of the per-tensor norms
        (float32 overflows to inf above ~1.8e19, as it does there).
        """
        device = norms.device
        if self._matrix is None or self._matrix.device != device:
            pairs = [(i, j) for j, members in enumerate(self._membership) for i in members]
            self._matrix = torch.tensor(pairs, dtype=torch.long, device=device).reshape(-1, 2).T
        param_index, module_index = self._matrix[0], self._matrix[1]
        shape = (norms.shape[0], len(self.module_names))
        x = norms.index_select(1, param_index)
        gone = x < 0  # absent (no gradient); NaN compares False, so it is not "gone"
        values = x.masked_fill(gone, 0.0)  # NaN and inf stay, and propagate through sums
        p = self.norm_type
        if math.isinf(p):
            where = module_index.expand(shape[0], -1)
            agg = x.new_zeros(shape).scatter_reduce_(1, where, values, reduce="amax")
            nan = x.new_zeros(shape).index_add_(1, module_index, values.isnan().to(x.dtype))
            agg = agg.masked_fill(nan > 0, math.nan)
        elif p == 2:
            agg = _sqrt(x.new_zeros(shape).index_add_(1, module_index, values * values))
        else:
            agg = x.new_zeros(shape).index_add_(1, module_index, values.pow(p)).pow_(1.0 / p)
        present = x.new_zeros(shape).index_add_(1, module_index, (~gone).to(x.dtype))
        return agg.masked_fill_(present == 0, math.nan)

    # -- results and lifetime ------------------------------------------------------

    def summary(self) -> Summary:
        """Flush, then: steps, clip rate, norm percentiles, spikes, non-finite steps."""
        self.flush()
        return self.history.summary()

    @property
    def spikes(self) -> list[SpikeEvent]:
        """The spikes detected so far (among flushed steps)."""
        return list(self.history.spikes)

    def close(self) -> None:
        """Flush and close the writers (each of them, even if one raises). Idempotent.

        If the flush raises, the writers are closed all the same and the flush's error
        is the one raised (a note tells any error closing them).
        """
        if self.closed:
            return
        try:
            self.flush()
        except BaseException as error:
            self.closed = True
            try:
                _call_each(self.writers, "close")
            except Exception as also:
                _note(error, f"closing the writers then raised {type(also).__name__}: {also}")
            raise
        self.closed = True
        _call_each(self.writers, "close")

    def __enter__(self) -> GradMonitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GradMonitor({len(self.params)} params, {len(self.module_names)} modules, "
            f"log_every={self.log_every}, step={self.step})"
        )


class _Match:
    """How to write a step's norms into a row's per-parameter slots (index cached on device)."""

    def __init__(
        self,
        kind: str,
        index: Tensor | None = None,
        present: Tensor | None = None,
        keep: tuple[Tensor, ...] = (),
    ) -> None:
        self.kind = kind  # "identity" | "select" (all present) | "gather" (some absent) | "absent"
        self.index = index
        self.present = present
        self.keep = keep

    @staticmethod
    def build(index: list[int], device: torch.device) -> _Match:
        if all(i < 0 for i in index):
            return _ALL_ABSENT
        where = torch.tensor([max(i, 0) for i in index], dtype=torch.long, device=device)
        if all(i >= 0 for i in index):
            return _Match("select", where)
        present = torch.tensor([i >= 0 for i in index], device=device)
        return _Match("gather", where, present)

    def keeping(self, params: tuple[Tensor, ...]) -> _Match:
        return _Match(self.kind, self.index, self.present, params)

    def write(self, norms: Tensor, out: Tensor) -> None:
        if self.kind == "identity":
            out.copy_(norms)
        elif self.kind == "select":
            assert self.index is not None
            _index_select(norms, self.index, out)
        elif self.kind == "gather":
            assert self.index is not None and self.present is not None
            out.copy_(torch.where(self.present, norms.index_select(0, self.index), _ABSENT))
        else:
            out.fill_(_ABSENT)


def _sqrt(x: Tensor) -> Tensor:
    """``x.sqrt()`` of non-negative ``x``; on the CPU computed as ``x * rsqrt(x)``.

    torch's CPU ``sqrt`` of a few thousand elements goes to MKL's threaded
    ``vsSqrt``, whose parallel region can cost ~10 ms when the cores are busy
    (measured on the 2-core benchmark machine); ``rsqrt`` is ATen's own vectorized
    kernel. 0, inf and NaN, whose square roots are themselves, pass through.
    """
    if x.device.type != "cpu":
        return x.sqrt()
    regular = (x > 0) & (x < math.inf)
    return torch.where(regular, x * x.rsqrt(), x)


def _index_select(norms: Tensor, index: Tensor, out: Tensor) -> None:
    if norms.dtype == out.dtype:
        torch.index_select(norms, 0, index, out=out)
    else:
        out.copy_(norms.index_select(0, index))


_IDENTITY = _Match("identity")
_ALL_ABSENT = _Match("absent")


def _spike_min_history(min_history: int | None, window: int) -> int:
    """``spike_min_history``, checked against ``spike_window`` (None: ``min(20, window)``).

    A bad ``window`` is left to :class:`SpikeDetector`, which names it.
    """
    valid_window = isinstance(window, int) and not isinstance(window, bool) and window >= 3
    if min_history is None:
        return min(20, window) if valid_window else 20
    if isinstance(min_history, bool) or not isinstance(min_history, int):
        raise ValueError(f"spike_min_history must be an int or None; got {min_history!r}")
    if valid_window and not 3 <= min_history <= window:
        raise ValueError(
            f"spike_min_history must be in [3, spike_window={window}]; got {min_history}"
        )
    return min_history


def _spike_rel_floor(rel_floor: float) -> float:
    """``spike_rel_floor`` as a float, checked (any real number: NumPy's too)."""
    ok = isinstance(rel_floor, numbers.Real) and not isinstance(rel_floor, bool)
    if not (ok and 0 < float(rel_floor) < math.inf):
        raise ValueError(f"spike_rel_floor must be a finite number > 0; got {rel_floor!r}")
    return float(rel_floor)


def _writers(writers: Any) -> list[Writer]:
    """The monitor's writers from one writer or callable, or an iterable of them."""
    if isinstance(writers, Writer) or callable(writers):
        return [as_writer(writers)]
    if isinstance(writers, str | bytes | os.PathLike):
        raise TypeError(
            f"writers takes Writer instances or callables, not a path; got {writers!r}: "
            "use writers=[CSVWriter(path)] or writers=[JSONLWriter(path)]"
        )
    try:
        items = list(writers)
    except TypeError:
        raise TypeError(
            "writers must be a Writer, a callable, or a list of them; "
            f"got {type(writers).__name__} {writers!r:.60}"
        ) from None
    return [as_writer(w) for w in items]


def _call_each(writers: Sequence[Writer], method: str, *args: Any) -> None:
    """Call ``method`` of every writer; then raise the first error, if any.

    One failing writer (a full disk, a buggy callback) does not keep the block from
    the others, nor the others from closing. The error keeps its type and message; a
    note names the writer that raised it, and any other writer that raised too.
    """
    first: Exception | None = None
    for writer in writers:
        try:
            getattr(writer, method)(*args)
        except Exception as error:
            if first is None:
                _note(error, f"raised by the monitor's writer {writer!r} in {method}()")
                first = error
            else:
                _note(
                    first,
                    f"the writer {writer!r} also raised in {method}(): "
                    f"{type(error).__name__}: {error}",
                )
    if first is not None:
        raise first


def _note(error: BaseException, text: str) -> None:
    """``error.add_note(text)``; on Python 3.10, which lacks it, the same ``__notes__`` list.

    Tracebacks show the notes from Python 3.11 on (and pytest matches them on 3.10).
    """
    add_note = getattr(error, "add_note", None)
    if add_note is not None:
        add_note(text)
        return
    notes = getattr(error, "__notes__", None)
    if not isinstance(notes, list):
        notes = []
        setattr(error, "__notes__", notes)  # noqa: B010 - not in Python 3.10's stubs
    notes.append(text)


def _as_value(value: Any, nan: Tensor, name: str) -> tuple[Tensor, float | None]:
    """A device slot for the stacked row, and a host value to put in place of it."""
    if value is None:
        return nan, None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar; got a tensor of shape {tuple(value.shape)}")
        v = value.detach().reshape(())
        return (v if v.device == nan.device else v.to(nan.device, non_blocking=True)), None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a one-element tensor; got {value!r}")
    return nan, float(value)


def _named_parameters(obj: Any) -> list[tuple[str, Tensor]]:
    if isinstance(obj, torch.nn.Module):
        return [(n, p) for n, p in obj.named_parameters() if p.requires_grad]
    if isinstance(obj, Tensor):
        return [("params[0]", obj)]
    out: list[tuple[str, Tensor]] = []
    seen: set[int] = set()
    for index, item in enumerate(obj):
        if isinstance(item, Tensor):
            name, param = f"params[{index}]", item
        elif (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], Tensor)
        ):
            name, param = item
        else:
            raise TypeError(
                f"GradMonitor takes a Module, tensors or (name, tensor) pairs; item {index} "
                f"is a {type(item).__name__}"
            )
        if id(param) not in seen:
            seen.add(id(param))
            out.append((name, param))
    return out


def _owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _beneath(owner: str, module: str) -> bool:
    return module == "" or owner == module or owner.startswith(module + ".")


def _modules(names: list[str], modules: ModulesArg) -> tuple[list[str], list[list[int]]]:
    """The reported module names and, for each, the indices of the parameters beneath it."""
    owners = [_owner(n) for n in names]
    chosen: list[str]
    if modules is None:
        return [], []
    if isinstance(modules, str):
        if modules != "leaf":
            raise ValueError(
                f"modules must be 'leaf', a depth >= 1, a list of module names or None; "
                f"got {modules!r}"
            )
        chosen = list(dict.fromkeys(o for o in owners if o))
    elif isinstance(modules, int) and not isinstance(modules, bool):
        if modules < 1:
            raise ValueError(f"module depth must be >= 1; got {modules}")
        chosen = list(dict.fromkeys(".".join(o.split(".")[:modules]) for o in owners if o))
    elif isinstance(modules, Sequence):
        chosen = list(dict.fromkeys(modules))
        for m in chosen:
            if not isinstance(m, str):
                raise TypeError(f"module names must be strings; got {m!r}")
            if not any(_beneath(o, m) for o in owners):
                known = ", ".join(list(dict.fromkeys(o for o in owners if o))[:8])
                raise ValueError(
                    f"no monitored parameter is in module {m!r}; modules with parameters "
                    f"include: {known or '(root only)'}"
                )
    else:
        raise TypeError(
            f"modules must be 'leaf', a depth, a list of module names or None; got {modules!r}"
        )
    membership = [[i for i, o in enumerate(owners) if _beneath(o, m)] for m in chosen]
    return chosen, membership
