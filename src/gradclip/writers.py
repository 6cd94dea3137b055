"""Where a :class:`~gradclip.monitor.GradMonitor` sends its rows: CSV, JSONL, TensorBoard, callback.

A monitor hands each writer one :class:`LogBlock` per flush (every ``log_every``
steps, on ``flush()`` and on ``close()``): the host values of the steps since the
last flush, and the spikes found among them. Writers never see device tensors.

**Columns**, in this order (stable; :data:`BASE_COLUMNS` then the per-layer ones):

=============== ===========================================================
``step``        the monitor's step count including this step (1, 2, ...)
``total_norm``  pre-clip global gradient norm
``clipped_norm`` post-clip global norm (``total_norm`` when not clipping)
``threshold``   the norm the strategy clipped to (``inf``: no clipping)
``scale``       factor applied to the gradients (1 = untouched)
``clipped``     1 if any gradient was scaled down, else 0
``nonfinite``   number of monitored parameters with a NaN/inf gradient norm
``loss``        the loss passed to ``observe`` (NaN if none)
``lr``          the learning rate passed to ``observe`` (NaN if none)
``norm_score``  robust z-score of ``total_norm`` (NaN while warming up)
``loss_score``  robust z-score of ``loss``
``norm_spike``  1 if ``total_norm`` spiked at this step, else 0
``loss_spike``  1 if ``loss`` spiked at this step, else 0
``param/NAME``  per-parameter gradient norm (NaN: no gradient this step)
``module/NAME`` per-module norm over every parameter beneath the module
=============== ===========================================================

**Crash safety.** The file writers append each block to an unbuffered file with a
single ``write`` system call, so a run that dies between flushes leaves every
flushed step in the file and no partial row; :func:`read_log` also ignores a final
line without its newline (a write cut short by a kill). A file writer that resumes
such a file first truncates it back to its last complete line (the cut row never
was complete), so the rows it appends start on a line of their own and the log
stays readable. The CSV header is written once, when the file is new or empty.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradclip.history import History
from gradclip.spikes import SpikeEvent

__all__ = [
    "BASE_COLUMNS",
    "MODULE_PREFIX",
    "PARAM_PREFIX",
    "CSVWriter",
    "CallbackWriter",
    "JSONLWriter",
    "LogBlock",
    "LogData",
    "LogFormatError",
    "TensorBoardWriter",
    "Writer",
    "read_log",
]

BASE_COLUMNS = (
    "step",
    "total_norm",
    "clipped_norm",
    "threshold",
    "scale",
    "clipped",
    "nonfinite",
    "loss",
    "lr",
    "norm_score",
    "loss_score",
    "norm_spike",
    "loss_spike",
)
"""The per-step columns every log starts with, in order."""

INT_COLUMNS = frozenset({"step", "clipped", "nonfinite", "norm_spike", "loss_spike"})
"""Columns whose values are whole numbers (written without a decimal point)."""

PARAM_PREFIX = "param/"
MODULE_PREFIX = "module/"

Value = float | int


@dataclass(frozen=True)
class LogBlock:
    """The rows of one flush.

    Attributes:
        columns: column names, in order (see the module docstring).
        rows: one list per step, aligned with ``columns``; ``step`` and the
            :data:`INT_COLUMNS` are ints, the rest floats (NaN for missing values).
        events: the spikes detected among these steps.
        float_digits: significant digits the file writers use for floats, or None
            for Python's shortest round-trip ``repr``. The monitor sets 9 for values
            that were float32 on the device: parsed back as float32 they are
            exact, and lines are shorter and faster to format than with ``repr``
            of the float32 value as a Python float (17 digits).
    """

    columns: tuple[str, ...]
    rows: list[list[Value]]
    events: tuple[SpikeEvent, ...] = field(default=())
    float_digits: int | None = None

    def records(self) -> Iterator[dict[str, Value]]:
        """Each row as a ``{column: value}`` dict, in column order."""
        for row in self.rows:
            yield dict(zip(self.columns, row))


class Writer:
    """A sink for monitor rows. Subclasses implement :meth:`write` (and :meth:`close`)."""

    def write(self, block: LogBlock) -> None:
        """Record one flush's rows (called on the host, after the transfer)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release files and handles; called once by the monitor's ``close()``."""


class _FileWriter(Writer):
    """Appends text blocks to a file: one unbuffered ``write`` per block, no partial rows.

    The file is opened unbuffered in append mode, so a block goes to the OS in one
    ``write`` system call as soon as it is formatted: nothing waits in a Python
    buffer for a crash to lose.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._file: io.FileIO | None = None
        self._columns: tuple[str, ...] | None = None

    def _open(self, columns: tuple[str, ...]) -> tuple[io.FileIO, str]:
        """The open file, and its state: ``"new"``, ``"existing"`` or ``"open"``.

        ``"new"``: just opened and empty; ``"existing"``: just opened, not empty;
        ``"open"``: opened by an earlier call.

        On the first call, a file that is not empty is checked by
        :meth:`_check_existing` before anything in it changes; then, if its last line
        has no newline (a write cut short by a crash), that partial line is truncated
        away. A file holding nothing but a partial line is then empty, so ``"new"``.
        """
        if self._file is not None:
            return self._file, "open"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = io.FileIO(self.path, "a")
        try:
            size = os.fstat(f.fileno()).st_size
            if size:
                complete, tail = _complete_lines(self.path, size)
                self._check_existing(columns, complete, tail)
                if complete < size:
                    os.ftruncate(f.fileno(), complete)
                    size = complete
        except BaseException:
            f.close()
            raise
        self._file = f
        return f, "new" if size == 0 else "existing"

    def _check_existing(self, columns: tuple[str, ...], complete: int, tail: bytes) -> None:
        """Raise ValueError if a non-empty file is not a log these rows can extend.

        Args:
            columns: the block's columns.
            complete: bytes of the file in complete (newline-terminated) lines.
            tail: the start of the partial line after them (empty if none).
        """

    def _check_columns(self, columns: tuple[str, ...]) -> None:
        if self._columns is None:
            self._columns = columns
        elif columns != self._columns:
            raise ValueError(
                f"{type(self).__name__} for {self.path} got a block with different columns "
                f"({len(columns)} instead of {len(self._columns)}); use one writer per monitor"
            )

    def _append(self, f: io.FileIO, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        while data:  # a regular file takes it all at once; loop in case it does not
            written = f.write(data)
            data = data[written or 0 :]
        if self.fsync:
            os.fsync(f.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class CSVWriter(_FileWriter):
    """Append rows to a CSV file: a header line, then one line per step.

    Integer columns (:data:`INT_COLUMNS`) are written as integers. Floats are written
    with ``%.{d}g``, ``d`` being the block's ``float_digits`` (9 for the monitor's
    float32 values: read back as float32 they are exact), or, when that is None
    (float64 values), with ``repr``, Python's shortest round-trip form; NaN and
    infinity are ``nan``, ``inf`` and ``-inf``. A new or empty file gets the header;
    an existing file is appended to, and must have the same header (a last line cut
    short by a crash is dropped first, see the module docstring).

    Args:
        path: the file (its directory is created).
        fsync: also ``os.fsync`` after each block, so an OS crash or power loss
            cannot lose flushed steps either (a process crash cannot lose them anyway).

    Raises:
        ValueError: the existing file's header differs from the monitor's columns, or
            it is not a text file.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "log.csv")
        >>> writer = CSVWriter(path)
        >>> writer.write(LogBlock(("step", "total_norm"), [[1, 0.5], [2, float("inf")]]))
        >>> writer.close()
        >>> print(open(path).read(), end="")
        step,total_norm
        1,0.5
        2,inf
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        super().__init__(path, fsync=fsync)

    def write(self, block: LogBlock) -> None:
        """Append the block's rows (and the header first, if the file is empty)."""
        self._check_columns(block.columns)
        f, state = self._open(block.columns)
        out = io.StringIO()
        if state == "new":
            out.write(_csv_line(block.columns))
        if block.float_digits is None:
            for row in block.rows:
                out.write(",".join(map(repr, row)))
                out.write("\n")
        else:  # one C-level format per row
            real = f"%.{block.float_digits}g"
            template = ",".join("%d" if c in INT_COLUMNS else real for c in block.columns)
            for row in block.rows:
                out.write(template % tuple(row))
                out.write("\n")
        self._append(f, out.getvalue())

    def _check_existing(self, columns: tuple[str, ...], complete: int, tail: bytes) -> None:
        """The file's header must be ``columns`` (or, cut short, the start of it)."""
        if complete == 0:  # not even the header line is complete
            if _csv_line(columns).encode("utf-8").startswith(tail):
                return
            header = next(csv.reader([tail.decode("utf-8", "replace")]), [])
        else:
            try:
                with open(self.path, encoding="utf-8", newline="") as f:
                    header = next(csv.reader(f), [])
            except UnicodeDecodeError:
                raise ValueError(
                    f"{self.path} exists and is not a text file; write to a new file"
                ) from None
            if tuple(header) == columns:
                return
        raise ValueError(
            f"{self.path} already holds a log with other columns ({len(header)} columns, "
            f"first {header[:3]}); write to a new file"
        )


def _csv_line(columns: tuple[str, ...]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(columns)
    return out.getvalue()


_CHUNK = 1 << 16


def _complete_lines(path: Path, size: int) -> tuple[int, bytes]:
    """Bytes of the file in complete lines, and the start of the partial line after them.

    Reads backwards from the end of the file (of ``size`` bytes) to its last newline;
    usually the last byte.
    """
    with open(path, "rb") as f:
        end, complete = size, 0
        while end > 0:
            start = max(0, end - _CHUNK)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                complete = start + newline + 1
                break
            end = start
        f.seek(complete)
        return complete, f.read(min(size - complete, _CHUNK))


def _json_value(value: Value, real: str | None = None) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "null"
    if math.isinf(value):
        return "1e999" if value > 0 else "-1e999"
    return repr(value) if real is None else real % value


class JSONLWriter(_FileWriter):
    """Append rows to a JSON Lines file: one object per step, one per spike event.

    Row objects have the columns as keys, in order. JSON has no NaN or infinity:
    NaN is written as ``null`` and ±infinity as ``±1e999``, which is valid JSON and
    which ``json.loads`` (and JavaScript) read back as infinity. Spikes are separate
    lines: ``{"event": "spike", "step": ..., "metric": ..., "value": ..., "score": ...}``
    written after the rows of their block.

    Floats are written like :class:`CSVWriter` writes them (``%.{d}g`` with the
    block's ``float_digits``, else ``repr``).

    Args:
        path: the file (its directory is created); appended to if it exists (a last
            line cut short by a crash is dropped first, see the module docstring).
        fsync: also ``os.fsync`` after each block.

    Raises:
        ValueError: the existing file ends with a partial line that is not the start
            of a JSON object (not a JSONL log: nothing in it is changed).

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "log.jsonl")
        >>> writer = JSONLWriter(path)
        >>> writer.write(LogBlock(("step", "loss"), [[1, float("nan")], [2, 0.25]]))
        >>> writer.close()
        >>> print(open(path).read(), end="")
        {"step": 1, "loss": null}
        {"step": 2, "loss": 0.25}
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        super().__init__(path, fsync=fsync)

    def write(self, block: LogBlock) -> None:
        """Append the block's rows, then its spike events."""
        self._check_columns(block.columns)
        f, _ = self._open(block.columns)
        keys = [json.dumps(c) for c in block.columns]
        real = None if block.float_digits is None else f"%.{block.float_digits}g"
        out = io.StringIO()
        for row in block.rows:
            out.write("{")
            out.write(", ".join(f"{k}: {_json_value(v, real)}" for k, v in zip(keys, row)))
            out.write("}\n")
        for e in block.events:
            fields = {"event": "spike", "step": e.step, "metric": e.metric}
            head = json.dumps(fields)[:-1]
            out.write(
                f'{head}, "value": {_json_value(e.value)}, "score": {_json_value(e.score)}}}\n'
            )
        self._append(f, out.getvalue())

    def _check_existing(self, columns: tuple[str, ...], complete: int, tail: bytes) -> None:
        """A partial last line must be the start of a JSON object (a row cut short)."""
        if tail.strip() and not tail.lstrip().startswith(b"{"):
            raise ValueError(
                f"{self.path} ends with a partial line that is not a JSON object "
                f"({tail[:30]!r}); is it a JSONL log? Write to a new file"
            )


class TensorBoardWriter(Writer):
    """Write rows as TensorBoard scalars (through ``torch.utils.tensorboard``).

    Each column but ``step`` becomes the scalar ``prefix + column`` at its step
    (``gradclip/total_norm``, ``gradclip/param/fc.weight``, ...); NaN values (no
    loss given, no gradient, warming up) are skipped. Each spike is also written as
    the scalar ``prefix + "spike/" + metric`` with the spiking value, at its step.

    Args:
        log_dir: the run directory (or pass ``summary_writer``).
        prefix: prepended to every tag.
        per_layer: also write the ``param/`` and ``module/`` columns.
        summary_writer: an existing ``SummaryWriter`` to write to (not closed by
            :meth:`close`).

    Raises:
        ImportError: the ``tensorboard`` package is missing; install the
            ``gradclip[tensorboard]`` extra.

    Example:
        ``TensorBoardWriter("runs/exp1")`` writes to a new run directory. Here a
        stand-in for the ``SummaryWriter`` shows which scalars a block becomes: the
        NaN loss is left out, the per-parameter column too (``per_layer=False``),
        and the spike is written under ``spike/``:

        >>> class Recorder:  # records what a SummaryWriter would be given
        ...     def __init__(self):
        ...         self.scalars = []
        ...     def add_scalar(self, tag, value, step):
        ...         self.scalars.append((tag, value, step))
        ...     def flush(self):
        ...         pass
        >>> recorder = Recorder()
        >>> writer = TensorBoardWriter(summary_writer=recorder, per_layer=False)
        >>> columns = ("step", "total_norm", "loss", "param/fc.weight")
        >>> spike = SpikeEvent(2, "total_norm", 9.0, 6.5)
        >>> writer.write(
        ...     LogBlock(columns, [[1, 0.5, float("nan"), 0.4], [2, 9.0, 1.25, 8.9]], (spike,))
        ... )
        >>> for scalar in recorder.scalars:
        ...     print(scalar)
        ('gradclip/total_norm', 0.5, 1)
        ('gradclip/total_norm', 9.0, 2)
        ('gradclip/loss', 1.25, 2)
        ('gradclip/spike/total_norm', 9.0, 2)
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        prefix: str = "gradclip/",
        per_layer: bool = True,
        summary_writer: Any = None,
    ) -> None:
        self.prefix = prefix
        self.per_layer = per_layer
        self._owned = summary_writer is None
        if summary_writer is None:
            if log_dir is None:
                raise ValueError("TensorBoardWriter needs a log_dir or a summary_writer")
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    "TensorBoardWriter needs the tensorboard package: "
                    "pip install 'gradclip[tensorboard]'"
                ) from error
            summary_writer = SummaryWriter(log_dir=os.fspath(log_dir))
        self.summary_writer = summary_writer

    def write(self, block: LogBlock) -> None:
        """Add every non-NaN value as a scalar at its step, and the spikes; then flush."""
        sw = self.summary_writer
        keep = [
            (i, self.prefix + c)
            for i, c in enumerate(block.columns)
            if c != "step" and (self.per_layer or not c.startswith((PARAM_PREFIX, MODULE_PREFIX)))
        ]
        for row in block.rows:
            step = int(row[0])
            for i, tag in keep:
                value = row[i]
                if not (isinstance(value, float) and math.isnan(value)):
                    sw.add_scalar(tag, value, step)
        for e in block.events:
            sw.add_scalar(f"{self.prefix}spike/{e.metric}", e.value, e.step)
        sw.flush()

    def close(self) -> None:
        """Flush; close the ``SummaryWriter`` if this writer created it."""
        self.summary_writer.flush()
        if self._owned:
            self.summary_writer.close()


class CallbackWriter(Writer):
    """Call a function with each step's record (a dict in column order), and on spikes.

    A plain callable in a monitor's ``writers`` is wrapped in one of these.

    Args:
        fn: called once per step with ``{column: value}``, e.g.
            ``lambda r: wandb.log(r, step=r["step"])``.
        on_spike: called once per :class:`~gradclip.spikes.SpikeEvent`, or None.

    Example:
        >>> seen = []
        >>> CallbackWriter(seen.append).write(LogBlock(("step", "total_norm"), [[1, 0.5]]))
        >>> seen
        [{'step': 1, 'total_norm': 0.5}]
    """

    def __init__(
        self,
        fn: Callable[[dict[str, Value]], object],
        *,
        on_spike: Callable[[SpikeEvent], object] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"CallbackWriter needs a callable; got {fn!r}")
        self.fn = fn
        self.on_spike = on_spike

    def write(self, block: LogBlock) -> None:
        """Call ``fn`` per step, then ``on_spike`` per event."""
        for record in block.records():
            self.fn(record)
        if self.on_spike is not None:
            for e in block.events:
                self.on_spike(e)

    def __repr__(self) -> str:
        return f"CallbackWriter({self.fn!r})"


# ---------------------------------------------------------------------------
# Reading logs back


class LogFormatError(ValueError):
    """A log file that cannot be read; the message names the file and, if any, the line."""


@dataclass(frozen=True)
class LogData:
    """A log file's columns, column by column.

    Attributes:
        path: where it was read from.
        columns: the column names, in file order.
        values: column -> one float per step (NaN where missing).
    """

    path: Path
    columns: tuple[str, ...]
    values: dict[str, list[float]]

    def __len__(self) -> int:
        return len(self.values["step"])

    @property
    def steps(self) -> list[int]:
        """The step numbers."""
        return [int(s) for s in self.values["step"]]

    def column(self, name: str, default: float = math.nan) -> list[float]:
        """A column's values, or ``default`` for every step if the log has no such column."""
        if name in self.values:
            return self.values[name]
        return [default] * len(self)

    def layer_columns(self) -> list[str]:
        """The per-module columns if any, else the per-parameter ones."""
        modules = [c for c in self.columns if c.startswith(MODULE_PREFIX)]
        return modules or [c for c in self.columns if c.startswith(PARAM_PREFIX)]

    def spikes(self) -> list[SpikeEvent]:
        """The spikes recorded in the ``norm_spike``/``loss_spike`` columns."""
        events: list[SpikeEvent] = []
        for flag, metric, score in (
            ("norm_spike", "total_norm", "norm_score"),
            ("loss_spike", "loss", "loss_score"),
        ):
            if flag not in self.values:
                continue
            for i, (step, hit) in enumerate(zip(self.steps, self.values[flag])):
                if hit == 1:
                    events.append(
                        SpikeEvent(step, metric, self.column(metric)[i], self.column(score)[i])
                    )
        return sorted(events, key=lambda e: (e.step, e.metric))

    def history(self) -> History:
        """A :class:`~gradclip.history.History` of this log, for its summary."""
        history = History()
        history.extend(
            self.steps,
            self.values["total_norm"],
            clipped=self.column("clipped", 0.0),
            nonfinite=self.column("nonfinite", 0.0),
            spikes=self.spikes(),
        )
        return history


def read_log(path: str | os.PathLike[str]) -> LogData:
    r"""Read a CSV or JSONL log written by :class:`CSVWriter` or :class:`JSONLWriter`.

    The format is chosen by the suffix (``.csv``; ``.jsonl``, ``.ndjson``, ``.json``)
    or, failing that, by the first character. A last line without its newline (a
    write cut short) is ignored. Only ``step`` and ``total_norm`` are required, so a
    hand-made log of norms works too.

    Raises:
        LogFormatError: the file is missing, empty, or malformed (message names the
            file and line).

    Example:
        A hand-made log of norms (an empty field is a missing value):

        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "norms.csv")
        >>> with open(path, "w", encoding="utf-8") as f:
        ...     _ = f.write("step,total_norm,loss\n1,0.5,2.0\n2,3.25,\n")
        >>> log = read_log(path)
        >>> log.columns, log.steps, len(log)
        (('step', 'total_norm', 'loss'), [1, 2], 2)
        >>> log.column("total_norm"), log.column("loss"), log.column("clipped", 0.0)
        ([0.5, 3.25], [2.0, nan], [0.0, 0.0])
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LogFormatError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise LogFormatError(f"{p}: is a directory, not a log file") from None
    except UnicodeDecodeError:
        raise LogFormatError(f"{p}: not a text file (expected CSV or JSONL)") from None
    except OSError as error:
        raise LogFormatError(f"{p}: cannot read ({error.strerror or error})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    elif lines:
        lines.pop()  # an unterminated last line: a write cut short
    if not any(line.strip() for line in lines):
        raise LogFormatError(f"{p}: empty log")
    suffix = p.suffix.lower()
    is_json = suffix in (".jsonl", ".ndjson", ".json") or (
        suffix != ".csv" and lines[0].lstrip().startswith("{")
    )
    columns, rows = _parse_jsonl(p, lines) if is_json else _parse_csv(p, lines)
    for required in ("step", "total_norm"):
        if required not in columns:
            raise LogFormatError(
                f"{p}: no {required!r} column (found {', '.join(columns[:5]) or 'none'}); "
                "is this a gradclip log?"
            )
    if not rows:
        raise LogFormatError(f"{p}: the log has a header but no steps")
    values = {c: [row[i] for row in rows] for i, c in enumerate(columns)}
    return LogData(p, tuple(columns), values)


def _number(p: Path, lineno: int, column: str, text: str) -> float:
    if text == "" or text.lower() == "null":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise LogFormatError(
            f"{p}:{lineno}: column {column!r} has {text[:30]!r}, not a number"
        ) from None


def _parse_csv(p: Path, lines: list[str]) -> tuple[list[str], list[list[float]]]:
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except csv.Error as error:
        raise LogFormatError(f"{p}:1: bad CSV header ({error})") from None
    rows: list[list[float]] = []
    for lineno, fields in enumerate(reader, start=2):
        if not fields:
            continue
        if len(fields) != len(header):
            raise LogFormatError(
                f"{p}:{lineno}: {len(fields)} fields, but the header has {len(header)}"
            )
        rows.append([_number(p, lineno, c, f.strip()) for c, f in zip(header, fields)])
    return header, rows


def _parse_jsonl(p: Path, lines: list[str]) -> tuple[list[str], list[list[float]]]:
    columns: list[str] = []
    index: dict[str, int] = {}
    records: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise LogFormatError(f"{p}:{lineno}: not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise LogFormatError(f"{p}:{lineno}: expected a JSON object per line")
        if "event" in record:
            continue
        for key in record:
            if key not in index:
                index[key] = len(columns)
                columns.append(key)
        records.append(record)
    rows: list[list[float]] = []
    for lineno, record in enumerate(records, start=1):
        row = [math.nan] * len(columns)
        for key, value in record.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise LogFormatError(
                    f"{p}: step record {lineno}: {key!r} is {value!r}, not a number"
                )
            row[index[key]] = float(value)
        rows.append(row)
    return columns, rows


def as_writer(item: Writer | Callable[[dict[str, Value]], object]) -> Writer:
    """A :class:`Writer` as is; a plain callable wrapped in a :class:`CallbackWriter`."""
    if isinstance(item, Writer):
        return item
    if isinstance(item, type) and issubclass(item, Writer):
        raise TypeError(
            f"writers must be Writer instances or callables; got the class {item.__name__} "
            f"itself: create one, e.g. {item.__name__}(...)"
        )
    if callable(item):
        return CallbackWriter(item)
    raise TypeError(f"writers must be Writer instances or callables; got {item!r}")
