"""Writers: file formats read back, crash safety, TensorBoard through its own reader."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from gradclip.clippers.fixed import NormClip
from gradclip.monitor import GradMonitor
from gradclip.spikes import SpikeEvent
from gradclip.writers import (
    BASE_COLUMNS,
    CallbackWriter,
    CSVWriter,
    JSONLWriter,
    LogBlock,
    LogFormatError,
    TensorBoardWriter,
    read_log,
)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1))


def train(monitor: GradMonitor, net: nn.Module, steps: int, *, crash_after: int | None = None,
          spike_at: int | None = None) -> list[dict]:  # fmt: skip
    """Run a small training loop; returns the rows the monitor produced (via a callback)."""
    clipper = NormClip(net.parameters(), max_norm=0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        x = torch.randn(16, 3, generator=gen) * (50.0 if step == spike_at else 1.0)
        loss = (net(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        monitor.observe(clipper.clip_(), loss=loss, lr=0.05)
        opt.step()
        opt.zero_grad()
        if step == crash_after:
            raise RuntimeError(f"simulated crash after step {step}")
    return []


def strict_json(line: str) -> dict:
    def reject(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=reject)


# --- formats ----------------------------------------------------------------------------


def test_csv_and_jsonl_hold_the_same_rows_as_the_callback(tmp_path: Path) -> None:
    net = model()
    rows: list[dict] = []
    writers = [CSVWriter(tmp_path / "log.csv"), JSONLWriter(tmp_path / "log.jsonl"), rows.append]
    with GradMonitor(net, log_every=7, writers=writers) as monitor:
        train(monitor, net, 30, spike_at=25)
    assert [r["step"] for r in rows] == list(range(1, 31))
    lines = (tmp_path / "log.csv").read_text().splitlines()
    header = next(csv.reader(lines[:1]))
    assert header == list(monitor.columns)
    assert tuple(header[: len(BASE_COLUMNS)]) == BASE_COLUMNS
    assert header[len(BASE_COLUMNS) :] == [
        "param/0.weight", "param/0.bias", "param/2.weight", "param/2.bias",
        "module/0", "module/2",
    ]  # fmt: skip
    assert sum(1 for line in lines if line.startswith("step,")) == 1  # header written once
    for path in ("log.csv", "log.jsonl"):
        log = read_log(tmp_path / path)
        assert log.columns == monitor.columns
        for column in log.columns:  # float32 on the device: 9 digits recover it exactly
            got = torch.tensor(log.values[column], dtype=torch.float32)
            want = torch.tensor([r[column] for r in rows], dtype=torch.float32)
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    events = [strict_json(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    spikes = [e for e in events if e.get("event") == "spike"]
    assert {(s["step"], s["metric"]) for s in spikes} >= {(25, "total_norm")}
    assert all(s["score"] > 6 for s in spikes)
    from_log = read_log(tmp_path / "log.csv").spikes()
    from_monitor = sorted(monitor.spikes, key=lambda e: (e.step, e.metric))
    assert [(e.step, e.metric) for e in from_log] == [(e.step, e.metric) for e in from_monitor]
    for a, b in zip(from_log, from_monitor):
        assert a.value == pytest.approx(b.value, rel=1e-7)
        assert a.score == pytest.approx(b.score, rel=1e-7)


def test_jsonl_is_strict_json_with_nan_as_null_and_inf_as_1e999(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    writer = JSONLWriter(path)
    writer.write(
        LogBlock(
            ("step", "total_norm", "b", "c"),
            [[1, math.nan, math.inf, -math.inf], [2, 0.1, 1e-30, 3.0]],
            (SpikeEvent(2, "loss", 3.0, 7.5),),
        )
    )
    writer.close()
    lines = path.read_text().splitlines()
    first = strict_json(lines[0])
    assert first == {"step": 1, "total_norm": None, "b": math.inf, "c": -math.inf}
    assert strict_json(lines[1]) == {"step": 2, "total_norm": 0.1, "b": 1e-30, "c": 3.0}
    assert strict_json(lines[2]) == {
        "event": "spike", "step": 2, "metric": "loss", "value": 3.0, "score": 7.5
    }  # fmt: skip
    log = read_log(path)
    assert math.isnan(log.values["total_norm"][0]) and log.values["b"][0] == math.inf
    assert len(log) == 2


@pytest.mark.parametrize("digits", [9, None])
def test_float_values_round_trip_exactly(tmp_path: Path, digits: int | None) -> None:
    dtype = torch.float32 if digits == 9 else torch.float64
    values = torch.randn(300, dtype=dtype).exp().mul(10.0 ** torch.randint(-30, 30, (300,)))
    rows = [[i, v] for i, v in enumerate(values.tolist())]
    block = LogBlock(("step", "total_norm"), rows, float_digits=digits)
    for writer in (CSVWriter(tmp_path / "a.csv"), JSONLWriter(tmp_path / "a.jsonl")):
        writer.write(block)
        writer.close()
        got = torch.tensor(read_log(writer.path).values["total_norm"], dtype=dtype)
        assert torch.equal(got, values)
        writer.path.unlink()


def test_csv_appends_to_a_file_with_the_same_header_and_refuses_another(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    for start in (1, 3):
        w = CSVWriter(path)
        w.write(LogBlock(("step", "total_norm"), [[start, 1.0], [start + 1, 2.0]]))
        w.close()
    assert path.read_text() == "step,total_norm\n1,1.0\n2,2.0\n3,1.0\n4,2.0\n"
    w = CSVWriter(path)
    with pytest.raises(ValueError, match="already holds a log with other columns"):
        w.write(LogBlock(("step", "loss"), [[1, 1.0]]))


def test_callback_writer_and_on_spike() -> None:
    records: list[dict] = []
    spikes: list[SpikeEvent] = []
    event = SpikeEvent(1, "total_norm", 9.0, 8.0)
    CallbackWriter(records.append, on_spike=spikes.append).write(
        LogBlock(("step", "x"), [[1, 2.0]], (event,))
    )
    assert records == [{"step": 1, "x": 2.0}] and spikes == [event]
    with pytest.raises(TypeError, match="needs a callable"):
        CallbackWriter(3)  # type: ignore[arg-type]


# --- crash safety ------------------------------------------------------------------------


def test_exception_mid_run_leaves_every_flushed_step(tmp_path: Path) -> None:
    net = model()
    monitor = GradMonitor(
        net, log_every=5, writers=[CSVWriter(tmp_path / "c.csv"), JSONLWriter(tmp_path / "c.jsonl")]
    )
    with pytest.raises(RuntimeError, match="simulated crash after step 13"):
        train(monitor, net, 30, crash_after=13)
    for name in ("c.csv", "c.jsonl"):  # steps 1-10 were flushed; 11-13 were in the buffer
        log = read_log(tmp_path / name)
        assert log.steps == list(range(1, 11))
        assert all(len(v) == 10 for v in log.values.values())


def test_exception_inside_with_block_flushes_the_rest(tmp_path: Path) -> None:
    net = model()
    with (
        pytest.raises(RuntimeError),
        GradMonitor(net, log_every=5, writers=[CSVWriter(tmp_path / "c.csv")]) as monitor,
    ):
        train(monitor, net, 30, crash_after=13)
    assert read_log(tmp_path / "c.csv").steps == list(range(1, 14))


def test_hard_kill_mid_run_leaves_a_readable_log(tmp_path: Path) -> None:
    """The process dies without any cleanup (os._exit) after step 13."""
    script = textwrap.dedent(
        f"""
        import os, torch
        from gradclip.monitor import GradMonitor
        from gradclip.writers import CSVWriter, JSONLWriter
        net = torch.nn.Linear(3, 2)
        monitor = GradMonitor(net, log_every=4, writers=[
            CSVWriter({str(tmp_path / "k.csv")!r}), JSONLWriter({str(tmp_path / "k.jsonl")!r})])
        for step in range(1, 100):
            net(torch.randn(8, 3)).sum().backward()
            monitor.observe(loss=float(step))
            net.zero_grad()
            if step == 13:
                os._exit(3)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    for name in ("k.csv", "k.jsonl"):
        log = read_log(tmp_path / name)
        assert log.steps == list(range(1, 13))
        assert log.values["loss"] == [float(s) for s in range(1, 13)]


def test_a_line_cut_short_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "cut.csv"
    path.write_text("step,total_norm,loss\n1,0.5,2.0\n2,0.25,1.0\n3,0.1")
    assert read_log(path).steps == [1, 2]
    path = tmp_path / "cut.jsonl"
    path.write_text('{"step": 1, "total_norm": 0.5}\n{"step": 2, "total_no')
    assert read_log(path).steps == [1]


# The complete lines a writer left (steps 1 and 2), a row a crash cut short (step 3), and
# what a writer appends for steps 3 and 4 (total norms 1.5 and 2.0).
CUT_LOGS = {
    "csv": ("step,total_norm\n1,0.5\n2,0.25\n", "3,0.1", "3,1.5\n4,2.0\n"),
    "jsonl": ('{"step": 1, "total_norm": 0.5}\n{"step": 2, "total_norm": 0.25}\n',
              '{"step": 3, "total_norm": 0.',
              '{"step": 3, "total_norm": 1.5}\n{"step": 4, "total_norm": 2.0}\n'),
}  # fmt: skip
FILE_WRITERS = {"csv": CSVWriter, "jsonl": JSONLWriter}


def resume(path: Path, existing: str, rows: list[list[float]]) -> Path:
    """Write ``existing`` to ``path``, then append ``(step, total_norm)`` rows with its writer."""
    path.write_text(existing)
    writer = FILE_WRITERS[path.suffix.lstrip(".")](path)
    writer.write(LogBlock(("step", "total_norm"), rows))
    writer.close()
    return path


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_resuming_after_a_cut_short_line_drops_it_and_appends_on_a_new_line(
    tmp_path: Path, kind: str
) -> None:
    complete, cut, appended = CUT_LOGS[kind]
    path = resume(tmp_path / f"run.{kind}", complete + cut, [[3, 1.5], [4, 2.0]])
    log = read_log(path)
    assert log.steps == [1, 2, 3, 4]  # every complete step, then the appended ones
    assert log.values["total_norm"] == [0.5, 0.25, 1.5, 2.0]
    assert path.read_text() == complete + appended


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_resuming_a_file_that_ends_with_a_newline_changes_nothing_in_it(
    tmp_path: Path, kind: str
) -> None:
    complete, _, _ = CUT_LOGS[kind]
    path = resume(tmp_path / f"run.{kind}", complete, [[3, 1.5]])
    assert path.read_text().startswith(complete)
    assert read_log(path).steps == [1, 2, 3]


def test_resuming_through_a_monitor_after_a_cut_row(tmp_path: Path) -> None:
    """A monitor's CSV cut in its third row; the resumed monitor continues from step 3."""
    net = model()
    with GradMonitor(net, log_every=4, writers=CSVWriter(tmp_path / "m.csv")) as monitor:
        train(monitor, net, 4)
    lines = (tmp_path / "m.csv").read_text().splitlines(keepends=True)
    (tmp_path / "m.csv").write_text("".join(lines[:3]) + lines[3][:9])  # header, 1, 2, cut 3
    with GradMonitor(net, log_every=4, writers=CSVWriter(tmp_path / "m.csv")) as monitor:
        monitor.step = 2
        train(monitor, net, 3)
    log = read_log(tmp_path / "m.csv")
    assert log.steps == [1, 2, 3, 4, 5]
    assert log.columns == monitor.columns


def test_a_cut_short_csv_header_is_replaced_by_the_whole_header(tmp_path: Path) -> None:
    path = tmp_path / "run.csv"
    path.write_text("step,tot")
    writer = CSVWriter(path)
    writer.write(LogBlock(("step", "total_norm"), [[1, 0.5]]))
    writer.close()
    assert path.read_text() == "step,total_norm\n1,0.5\n"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("notes.csv", "hello", r"already holds a log with other columns \(1 columns, first \['hello'\]\)"),
        ("other.csv", "a,b\n1,2\n3,", r"already holds a log with other columns \(2 columns"),
        ("notes.jsonl", "hello", "ends with a partial line that is not a JSON object"),
    ],
)  # fmt: skip
def test_a_file_that_is_not_such_a_log_is_refused_and_left_as_it_was(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    writer = FILE_WRITERS[name.rsplit(".", 1)[1]](path)
    with pytest.raises(ValueError, match=message):
        writer.write(LogBlock(("step", "total_norm"), [[1, 0.5]]))
    writer.close()
    assert path.read_text() == content


def test_a_binary_file_is_refused_by_the_csv_writer(tmp_path: Path) -> None:
    path = tmp_path / "bin.csv"
    path.write_bytes(b"\xff\xfe\x00\x01\n")
    with pytest.raises(ValueError, match="is not a text file"):
        CSVWriter(path).write(LogBlock(("step", "total_norm"), [[1, 0.5]]))
    assert path.read_bytes() == b"\xff\xfe\x00\x01\n"


def test_csv_writer_formats_floats_as_its_docstring_says(tmp_path: Path) -> None:
    """``float_digits`` digits with %g (float32 values), else repr (float64 values)."""
    x = 0.1 + 0.2  # 0.30000000000000004: 17 significant digits
    for digits, expected in ((9, "1,0.3,nan,inf\n"), (None, f"1,{x!r},nan,inf\n")):
        path = tmp_path / f"{digits}.csv"
        writer = CSVWriter(path)
        writer.write(LogBlock(("step", "a", "b", "c"), [[1, x, math.nan, math.inf]], (), digits))
        writer.close()
        assert path.read_text().splitlines(keepends=True)[1] == expected


# --- reading errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", None, "no such file"),
        ("empty.csv", "", "empty log"),
        ("header.csv", "step,total_norm\n", "has a header but no steps"),
        ("nostep.csv", "a,b\n1,2\n", "no 'step' column"),
        ("short.csv", "step,total_norm\n1,2\n3\n", "short.csv:3: 1 fields, but the header has 2"),
        ("word.csv", "step,total_norm\n1,abc\n", "word.csv:2: column 'total_norm' has 'abc'"),
        ("bad.jsonl", '{"step": 1, "total_norm": 1}\nnot json\n', "bad.jsonl:2: not JSON"),
        ("list.jsonl", "[1, 2]\n", "expected a JSON object per line"),
        ("text.jsonl", '{"step": 1, "total_norm": "x"}\n', "'total_norm' is 'x', not a number"),
        ("binary.csv", b"\xff\xfe\x00\x01\n", "not a text file"),
    ],
)
def test_bad_logs_raise_one_line_errors(tmp_path: Path, name: str, content, message: str) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(LogFormatError, match=message.replace("(", r"\(")) as info:
        read_log(path)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_reading_a_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LogFormatError, match="is a directory"):
        read_log(tmp_path)


def test_a_minimal_hand_made_log_is_enough(tmp_path: Path) -> None:
    path = tmp_path / "norms.txt"
    path.write_text("step,total_norm\n1,0.5\n2,inf\n3,\n")
    log = read_log(path)
    summary = log.history().summary()
    assert summary.steps == 3 and summary.nonfinite_steps == (2, 3) and summary.clipped_steps == 0


# --- TensorBoard -------------------------------------------------------------------------


def test_tensorboard_events_read_back_with_event_accumulator(tmp_path: Path) -> None:
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    net = model()
    rows: list[dict] = []
    writer = TensorBoardWriter(tmp_path / "tb")
    with GradMonitor(net, log_every=6, writers=[writer, rows.append]) as monitor:
        train(monitor, net, 40, spike_at=33)
    acc = event_accumulator.EventAccumulator(
        str(tmp_path / "tb"), size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for column in ("total_norm", "clipped_norm", "scale", "loss", "lr", "param/0.weight",
                   "module/2", "nonfinite"):  # fmt: skip
        assert f"gradclip/{column}" in tags, column
        events = acc.Scalars(f"gradclip/{column}")
        assert [e.step for e in events] == [r["step"] for r in rows]
        assert [e.value for e in events] == pytest.approx([r[column] for r in rows], rel=1e-6)
    assert "gradclip/threshold" in tags
    # NaN values (scores while warming up) are skipped, the rest are there
    scores = acc.Scalars("gradclip/norm_score")
    assert [e.step for e in scores] == [r["step"] for r in rows if not math.isnan(r["norm_score"])]
    spikes = acc.Scalars("gradclip/spike/total_norm")
    assert [e.step for e in spikes] == [e.step for e in monitor.spikes if e.metric == "total_norm"]
    assert 33 in [e.step for e in spikes]


def test_tensorboard_writer_without_per_layer(tmp_path: Path) -> None:
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator"
    )
    net = model()
    with GradMonitor(net, log_every=3, writers=[TensorBoardWriter(tmp_path, per_layer=False,
                                                                   prefix="g/")]) as monitor:  # fmt: skip
        train(monitor, net, 4)
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "g/total_norm" in tags
    assert not [t for t in tags if t.startswith(("g/param/", "g/module/"))]


def test_tensorboard_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"gradclip\[tensorboard\]"):
        TensorBoardWriter("unused")
