"""GradMonitor: logged values against independent references, reuse of the clipper's
norms, nested module aggregation, absent/non-finite gradients, flushing, no host sync."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradclip.monitor
from gradclip.clippers.fixed import NoClip, NormClip
from gradclip.monitor import GradMonitor
from gradclip.writers import BASE_COLUMNS, CSVWriter, LogBlock, Writer, read_log
from sync_guard import no_host_sync

# --- a model with nesting: a module that owns a parameter and has children too ----------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))  # owned directly, beside children
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.out = nn.Linear(4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.inner(x) * self.scale)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.block = Block()
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)))


def backward(model: nn.Module, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(torch.randn(8, 3, generator=gen)).pow(2).mean() * scale
    loss.backward()
    return loss


def ref_norm(t: torch.Tensor, p: float = 2.0) -> float:
    """Norm of one tensor, from scratch in float64."""
    x = t.detach().double().reshape(-1).abs()
    if math.isinf(p):
        return float(x.max())
    return float(x.pow(p).sum() ** (1 / p))


def ref_combine(norms: list[float], p: float = 2.0) -> float:
    if math.isinf(p):
        return max(norms)
    return sum(n**p for n in norms) ** (1 / p)


def owner(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def beneath(name: str, module: str) -> bool:
    o = owner(name)
    return module == "" or o == module or o.startswith(module + ".")


def record(monitor_kwargs: dict, steps, model: nn.Module | None = None) -> list[dict]:
    rows: list[dict] = []
    monitor = GradMonitor(model, writers=[rows.append], **monitor_kwargs)
    for step in steps:
        step(monitor)
    monitor.close()
    return rows


def close(a: float, b: float, rel: float = 2e-6) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rel * max(abs(a), abs(b)) + 1e-12


# --- values -----------------------------------------------------------------------------


@pytest.mark.parametrize("with_clipper", [False, True], ids=["alone", "with-clipper"])
def test_values_equal_independent_per_parameter_norms(with_clipper: bool) -> None:
    model = Net()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    clipper = NormClip(model.parameters(), max_norm=0.05)
    rows: list[dict] = []
    monitor = GradMonitor(model, log_every=2, writers=[rows.append])
    expected = []
    for seed in range(5):
        backward(model, scale=1.0 + seed, seed=seed)
        pre = {n: ref_norm(p.grad) for n, p in named}
        total = ref_combine(list(pre.values()))
        if with_clipper:
            monitor.observe(clipper.clip_(), lr=0.1 * seed)
            post = ref_combine([ref_norm(p.grad) for _, p in named])
        else:
            monitor.observe(lr=0.1 * seed)
            post = total
        expected.append((pre, total, post))
    monitor.close()
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for row, (pre, total, post) in zip(rows, expected):
        assert list(row)[: len(BASE_COLUMNS)] == list(BASE_COLUMNS)
        assert close(row["total_norm"], total)
        assert close(row["clipped_norm"], post, rel=1e-5)
        for name, value in pre.items():
            assert close(row[f"param/{name}"], value), name
        assert "param/frozen.weight" not in row  # requires_grad=False is not monitored
        assert row["nonfinite"] == 0
        if with_clipper:
            assert row["threshold"] == pytest.approx(0.05)
            assert row["clipped"] == 1
            assert close(row["scale"], post / total, rel=1e-5)
        else:
            assert row["threshold"] == math.inf and row["scale"] == 1.0 and row["clipped"] == 0
    assert [r["lr"] for r in rows] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize(
    ("modules", "expected_names"),
    [
        ("leaf", ["embed", "block", "block.inner.0", "block.inner.1", "block.out", "head"]),
        (1, ["embed", "block", "head"]),
        (2, ["embed", "block", "block.inner", "block.out", "head"]),
        (
            ["", "block", "block.inner", "block.inner.0"],
            ["", "block", "block.inner", "block.inner.0"],
        ),
    ],
)
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
def test_module_norms_aggregate_nested_modules(modules, expected_names, p: float) -> None:
    model = Net()
    backward(model, seed=3)
    named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    per_param = {n: ref_norm(q.grad, p) for n, q in named}
    rows = record({"modules": modules, "norm_type": p}, [lambda m: m.observe()], model)
    got = {k.removeprefix("module/"): v for k, v in rows[0].items() if k.startswith("module/")}
    assert list(got) == [n or "(root)" for n in expected_names]
    for module in expected_names:
        members = [per_param[n] for n in per_param if beneath(n, module)]
        assert members, module
        assert close(got[module or "(root)"], ref_combine(members, p), rel=1e-5), module
    if "" in expected_names:  # the root covers everything: the total norm
        assert close(got["(root)"], rows[0]["total_norm"], rel=1e-5)


def test_leaf_module_with_own_and_child_parameters_covers_both() -> None:
    model = Net()
    backward(model)
    rows = record({}, [lambda m: m.observe()], model)
    block = [ref_norm(q.grad) for n, q in model.named_parameters() if n.startswith("block.")]
    assert close(rows[0]["module/block"], ref_combine(block), rel=1e-5)


def test_reusing_clipper_norms_equals_computing_alone_and_makes_no_second_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = Net()
    alone_rows: list[dict] = []
    reuse_rows: list[dict] = []
    alone = GradMonitor(model, log_every=3, writers=[alone_rows.append])
    reuse = GradMonitor(model, log_every=3, writers=[reuse_rows.append])
    clipper = NormClip(model.parameters(), max_norm=0.01)
    calls = []
    real = gradclip.monitor.tensor_norms

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gradclip.monitor, "tensor_norms", counting)
    for seed in range(4):
        backward(model, seed=seed)
        alone.observe()  # before clipping: the pre-clip gradients
        n_before = len(calls)
        reuse.observe(clipper.clip_())
        assert len(calls) == n_before, "observe(stats) computed the norms again"
    alone.close()
    reuse.close()
    assert len(calls) == 4
    for a, r in zip(alone_rows, reuse_rows):
        for key in a:
            if key.startswith(("param/", "module/")) or key in ("total_norm", "nonfinite"):
                assert a[key] == r[key], key  # same function on the same gradients
        assert r["clipped"] == 1 and a["clipped"] == 0


def test_norms_are_matched_by_identity_not_position() -> None:
    model = Net()
    params = [q for q in model.parameters() if q.requires_grad]
    # The clipper sees the parameters in reverse, plus one the monitor does not watch;
    # the monitor watches one the clipper does not clip.
    extra = nn.Parameter(torch.ones(3))
    extra.grad = torch.full((3,), 2.0)
    unclipped_name = "head.bias"
    clipped_params = [
        q for n, q in model.named_parameters() if q.requires_grad and n != unclipped_name
    ]
    clipper = NoClip([extra, *reversed(clipped_params)])
    backward(model, seed=1)
    named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    pre = {n: ref_norm(q.grad) for n, q in named}
    rows = record({"log_every": 4}, [lambda m: m.observe(clipper.clip_())] * 3, model)
    assert len(params) == len(named)
    for row in rows:
        for name, value in pre.items():
            if name == unclipped_name:
                assert math.isnan(row[f"param/{name}"])
            else:
                assert close(row[f"param/{name}"], value), name
        # head's module norm covers only its parameter that had a norm this step
        assert close(row["module/head"], pre["head.weight"])


def test_index_is_computed_once_per_params_tuple(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Net()
    clipper = NormClip(list(reversed(list(model.parameters()))), max_norm=1.0)
    built = []
    real = gradclip.monitor._Match.build
    monkeypatch.setattr(
        gradclip.monitor._Match, "build", staticmethod(lambda *a: built.append(1) or real(*a))
    )
    monitor = GradMonitor(model, log_every=100)
    for seed in range(5):
        backward(model, seed=seed)
        monitor.observe(clipper.clip_())
    assert len(built) == 1
    assert len(monitor._cache) == 1


def test_absent_gradients_are_nan_and_not_counted_as_nonfinite() -> None:
    model = Net()
    backward(model)
    model.head.bias.grad = None
    model.block.inner[0].weight.grad = None
    model.block.inner[0].bias.grad = None
    named = [(n, q) for n, q in model.named_parameters() if q.requires_grad and q.grad is not None]
    clipper = NormClip(model.parameters(), max_norm=1e9)
    rows = record({}, [lambda m: m.observe(), lambda m: m.observe(clipper.clip_())], model)
    for row in rows:
        assert math.isnan(row["param/head.bias"])
        assert math.isnan(row["module/block.inner.0"])  # no parameter of it had a gradient
        assert close(row["module/head"], ref_norm(model.head.weight.grad))
        assert row["nonfinite"] == 0
        assert close(row["total_norm"], ref_combine([ref_norm(q.grad) for _, q in named]))


def test_no_gradients_at_all() -> None:
    model = Net()
    model.zero_grad(set_to_none=True)
    clipper = NormClip(model.parameters(), max_norm=1.0)
    rows = record({}, [lambda m: m.observe(), lambda m: m.observe(clipper.clip_())], model)
    for row in rows:
        assert row["total_norm"] == 0.0
        assert all(math.isnan(v) for k, v in row.items() if k.startswith(("param/", "module/")))


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_nonfinite_gradients_are_counted_and_propagate_to_modules(bad: float) -> None:
    model = Net()
    backward(model)
    model.block.out.weight.grad[0, 0] = bad
    model.embed.bias.grad[1] = bad
    clipper = NormClip(model.parameters(), max_norm=1.0)
    # alone first: clipping by an infinite norm turns the gradients into NaN
    rows = record({}, [lambda m: m.observe(), lambda m: m.observe(clipper.clip_())], model)
    for row in rows:
        assert row["nonfinite"] == 2
        for name in ("param/block.out.weight", "module/block.out", "module/block", "module/embed"):
            assert math.isnan(row[name]) if math.isnan(bad) else row[name] == math.inf, name
        assert math.isfinite(row["module/head"])
        assert math.isfinite(row["param/embed.weight"])
    summary = GradMonitor(model)
    summary.observe()
    assert summary.summary().nonfinite_steps == (1,)


def test_loss_as_tensor_or_float_and_lr() -> None:
    model = Net()
    rows: list[dict] = []
    monitor = GradMonitor(model, log_every=10, writers=[rows.append])
    losses = []
    for seed in range(3):
        loss = backward(model, seed=seed)
        losses.append(float(loss.detach()))
        monitor.observe(
            loss=loss if seed != 1 else float(loss.detach()), lr=None if seed == 2 else 0.5
        )
    monitor.observe()
    monitor.close()
    assert [r["loss"] for r in rows[:3]] == pytest.approx(losses, rel=1e-6)
    assert math.isnan(rows[3]["loss"])
    assert [r["lr"] for r in rows[:2]] == [0.5, 0.5] and math.isnan(rows[2]["lr"])
    with pytest.raises(ValueError, match=r"loss must be a scalar; got a tensor of shape \(2,\)"):
        GradMonitor(model).observe(loss=torch.ones(2))


@pytest.mark.parametrize(
    ("loss", "lr", "expected"),
    [
        (np.float32(1.5), np.float64(0.25), (1.5, 0.25)),
        (np.int64(3), Fraction(1, 8), (3.0, 0.125)),
        (torch.tensor([2.5]), torch.tensor(0.5, dtype=torch.float64), (2.5, 0.5)),
    ],
    ids=["numpy-floats", "numpy-int-and-fraction", "one-element-tensors"],
)
def test_loss_and_lr_take_any_real_number(loss: object, lr: object, expected: tuple) -> None:
    model = Net()
    backward(model)
    rows = record({}, [lambda m: m.observe(loss=loss, lr=lr)], model)
    assert (rows[0]["loss"], rows[0]["lr"]) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss": "x"}, "loss must be a real number or a one-element tensor; got 'x'"),
        ({"lr": True}, "lr must be a real number or a one-element tensor; got True"),
        ({"loss": 1 + 2j}, r"loss must be a real number .*; got \(1\+2j\)"),
    ],
)
def test_loss_and_lr_that_are_not_numbers_are_type_errors(kwargs: dict, message: str) -> None:
    model = Net()
    backward(model)
    with pytest.raises(TypeError, match=message):
        GradMonitor(model).observe(**kwargs)


def test_stats_that_are_not_clip_stats_are_a_type_error() -> None:
    model = Net()
    backward(model)
    monitor = GradMonitor(model)
    with pytest.raises(TypeError, match=r"stats must be the ClipStats a clipper's clip_\(\) "
                       r"returned, or None; got int 3"):  # fmt: skip
        monitor.observe(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got Tensor"):
        monitor.observe(torch.tensor(1.0))  # type: ignore[arg-type]
    assert monitor.step == 0


def test_float64_gradients_are_logged_in_float64() -> None:
    model = Net().double()
    backward_64 = model(torch.randn(4, 3, dtype=torch.float64)).sum()
    backward_64.backward()
    rows = record({}, [lambda m: m.observe()], model)
    expected = ref_norm(model.head.weight.grad)
    assert rows[0]["param/head.weight"] == pytest.approx(expected, rel=1e-14)


# --- buffering and flushing -------------------------------------------------------------


def test_flushes_every_log_every_steps_and_on_close() -> None:
    model = Net()
    blocks: list = []

    class Spy(gradclip.writers.Writer):
        closed = False

        def write(self, block) -> None:
            blocks.append(block)

        def close(self) -> None:
            Spy.closed = True

    backward(model)
    with GradMonitor(model, log_every=4, writers=[Spy()]) as monitor:
        for step in range(10):
            monitor.observe()
            assert len(blocks) == (step + 1) // 4
        assert monitor._buffer is not None
        assert tuple(monitor._buffer.shape) == (4, 7 + len(monitor.params))  # bounded
    assert [len(b.rows) for b in blocks] == [4, 4, 2]
    assert Spy.closed and monitor.closed
    with pytest.raises(RuntimeError, match="after close"):
        monitor.observe()
    monitor.close()  # idempotent
    assert blocks[0].columns == monitor.columns


class Broken(Writer):
    """A writer whose write (and close) raise, like a file on a full disk."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def write(self, block: LogBlock) -> None:
        raise OSError(f"{self.name}: no space left on device")

    def close(self) -> None:
        self.closed = True
        raise OSError(f"{self.name}: close failed")

    def __repr__(self) -> str:
        return f"Broken({self.name!r})"


def test_a_failing_writer_does_not_keep_the_block_from_the_others(tmp_path: Path) -> None:
    model = Net()
    backward(model)
    rows: list[dict] = []
    first, second = Broken("first"), Broken("second")
    csv_writer = CSVWriter(tmp_path / "log.csv")
    monitor = GradMonitor(model, log_every=3, writers=[first, rows.append, second, csv_writer])
    monitor.observe()
    monitor.observe()
    with pytest.raises(OSError, match="first: no space left on device") as info:
        monitor.observe()  # the third step flushes
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "Broken('first')" in notes and "write()" in notes
    assert "Broken('second') also raised in write(): OSError: second: no space" in notes
    assert [r["step"] for r in rows] == [1, 2, 3]  # the writers after the failing ones ran
    assert read_log(tmp_path / "log.csv").steps == [1, 2, 3]
    assert monitor.history.steps.tolist() == [1, 2, 3]
    monitor.observe()  # the monitor goes on; the flushed steps are not handed out again
    with pytest.raises(OSError, match="first: no space left on device") as info:
        monitor.close()  # the flush's error, not the one closing the writers after it
    assert "closing the writers then raised OSError: first: close failed" in str(
        info.value.__notes__
    )
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert read_log(tmp_path / "log.csv").steps == [1, 2, 3, 4]
    assert monitor.closed and first.closed and second.closed  # every writer closed
    assert csv_writer._file is None


def test_every_writer_is_closed_even_if_one_close_raises(tmp_path: Path) -> None:
    model = Net()
    backward(model)

    class Closing(Broken):
        def write(self, block: LogBlock) -> None:
            pass

    broken, csv_writer = Closing("x"), CSVWriter(tmp_path / "log.csv")
    monitor = GradMonitor(model, writers=[broken, csv_writer])
    monitor.observe()
    with pytest.raises(OSError, match="x: close failed") as info:
        monitor.close()
    assert "Broken('x')" in "\n".join(info.value.__notes__) and "close()" in info.value.__notes__[0]
    assert broken.closed and csv_writer._file is None
    assert read_log(tmp_path / "log.csv").steps == [1]


def test_notes_without_add_note_go_to_the_same_notes_list() -> None:
    """Python 3.10 has no ``add_note``; the fallback fills ``__notes__`` as 3.11 does."""

    class NoAddNoteError(Exception):
        add_note = None  # as on Python 3.10

    error = NoAddNoteError("boom")
    gradclip.monitor._note(error, "first")
    gradclip.monitor._note(error, "second")
    assert error.__notes__ == ["first", "second"]
    with pytest.raises(NoAddNoteError, match="second"):  # pytest matches notes too
        raise error


def test_one_writer_or_callable_without_a_list(tmp_path: Path) -> None:
    model = Net()
    backward(model)
    rows: list[dict] = []
    with GradMonitor(model, writers=rows.append) as monitor:
        monitor.observe()
    assert [r["step"] for r in rows] == [1]
    with GradMonitor(model, writers=CSVWriter(tmp_path / "one.csv")) as monitor:
        monitor.observe()
        monitor.observe()
    assert read_log(tmp_path / "one.csv").steps == [1, 2]
    with GradMonitor(model, writers=(w for w in [rows.append])) as monitor:  # any iterable
        monitor.observe()
    assert len(rows) == 2


def test_flush_moves_the_block_to_the_host_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Net()
    backward(model)
    monitor = GradMonitor(model, log_every=100)
    for _ in range(7):
        monitor.observe()
    calls = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    monitor.flush()
    assert len(calls) == 1 and calls[0][0] == 7
    assert len(monitor.history) == 7


def test_per_layer_false_keeps_only_the_scalar_columns() -> None:
    model = Net()
    backward(model)
    model.head.weight.grad[0, 0] = math.nan
    rows = record({"per_layer": False}, [lambda m: m.observe()], model)
    assert tuple(rows[0]) == BASE_COLUMNS
    assert rows[0]["nonfinite"] == 1  # still derived from the recorded per-parameter norms


def test_summary_and_spikes() -> None:
    """The summary against the norms of the gradients fed in, computed from scratch."""
    model = nn.Linear(4, 1)
    gen = torch.Generator().manual_seed(0)
    monitor = GradMonitor(model, log_every=16, modules=None, spike_window=50)
    clipper = NormClip(model.parameters(), max_norm=1.25)  # near the median norm
    reference: list[float] = []  # each step's pre-clip total norm, float64, from the grads
    for step in range(1, 121):
        model.zero_grad()
        x = torch.randn(32, 4, generator=gen) * (40.0 if step == 90 else 1.0)
        loss = model(x).pow(2).mean()
        loss.backward()
        reference.append(ref_combine([ref_norm(p.grad) for p in model.parameters()]))
        monitor.observe(clipper.clip_(), loss=loss)
    summary = monitor.summary()
    assert summary.steps == 120
    assert (90, "total_norm") in {(e.step, e.metric) for e in summary.spikes}
    assert (90, "loss") in {(e.step, e.metric) for e in summary.spikes}
    assert sorted(summary.norm_percentiles) == [0.0, 10.0, 50.0, 90.0, 99.0, 100.0]
    for q, value in summary.norm_percentiles.items():
        assert value == pytest.approx(np.percentile(reference, q), rel=1e-5), q
    assert all(abs(n - 1.25) > 1e-4 for n in reference)  # no step too close to call
    expected_clipped = sum(1 for n in reference if n > 1.25)
    assert 10 < expected_clipped < 110  # both kinds of step occur
    assert summary.clipped_steps == expected_clipped
    assert summary.clip_rate == expected_clipped / 120
    assert "steps: 120" in str(summary)
    assert f"clipped: {expected_clipped} steps" in str(summary)


# --- spike options -------------------------------------------------------------------------


def spike_rows(losses: list[float], **kwargs) -> list[dict]:
    """A monitor fed ``losses`` (host floats, kept exactly) with a constant gradient."""
    weight = nn.Parameter(torch.zeros(2))
    weight.grad = torch.tensor([0.6, 0.8])  # norm 1, every step: norm_score 0
    rows: list[dict] = []
    with GradMonitor([weight], log_every=7, writers=[rows.append], **kwargs) as monitor:
        for loss in losses:
            monitor.observe(loss=loss)
    return rows


@pytest.mark.parametrize(
    ("kwargs", "first_scored"),
    [({}, 17), ({"spike_min_history": 5}, 6), ({"spike_min_history": 16}, 17)],
)
def test_spike_min_history_is_when_scoring_starts(kwargs: dict, first_scored: int) -> None:
    """With a window of 16 the default waits for 16 values (min(20, 16)); 5 catches a
    jump at step 8 that the default does not score at all."""
    losses = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0, 1.03, 5.0] + [1.0, 0.99, 1.01] * 10
    rows = spike_rows(losses, spike_window=16, **kwargs)
    scored = [r["step"] for r in rows if not math.isnan(r["loss_score"])]
    assert scored == list(range(first_scored, len(losses) + 1))
    assert [r["step"] for r in rows if not math.isnan(r["norm_score"])] == scored
    spikes = [r["step"] for r in rows if r["loss_spike"]]
    assert spikes == ([8] if first_scored <= 8 else [])


def test_spike_min_history_defaults_to_20_or_the_window() -> None:
    losses = [1.0] * 30
    rows = spike_rows(losses, spike_window=100)
    assert min(r["step"] for r in rows if not math.isnan(r["loss_score"])) == 21
    rows = spike_rows(losses, spike_window=4)
    assert min(r["step"] for r in rows if not math.isnan(r["loss_score"])) == 5


@pytest.mark.parametrize(("floor", "spike"), [(None, True), (0.01, True), (0.05, False),
                                              (np.float32(0.25), False)])  # fmt: skip
def test_spike_rel_floor_is_the_smallest_scale(floor: float | None, spike: bool) -> None:
    """A flat loss, then +10%: on the log scale the score is log(1.1) / floor (9.53 with
    the default 0.01: a spike; 1.91 with 0.05: not one)."""
    kwargs = {} if floor is None else {"spike_rel_floor": floor}
    rows = spike_rows([1.0] * 30 + [1.1], spike_window=16, **kwargs)
    expected = math.log(1.1) / (0.01 if floor is None else float(floor))
    assert rows[-1]["loss_score"] == pytest.approx(expected, rel=1e-12)
    assert rows[-1]["loss_spike"] == int(spike)
    assert rows[-1]["norm_score"] == 0.0


@pytest.mark.parametrize(("floor", "spike"), [(0.01, True), (0.05, False)])
def test_spike_rel_floor_on_the_raw_scale_is_relative_to_the_median(
    floor: float, spike: bool
) -> None:
    """A negative loss is scored raw: -1.8 against a flat -2 scores 0.2 / (floor * 2)."""
    rows = spike_rows([-2.0] * 30 + [-1.8], spike_window=16, spike_rel_floor=floor)
    assert rows[-1]["loss_score"] == pytest.approx(0.2 / (floor * 2.0), rel=1e-9)
    assert rows[-1]["loss_spike"] == int(spike)


def test_an_alternating_loss_has_no_spikes_but_a_jump_on_it_does() -> None:
    """The study's setting (window 16, threshold 6) and an odd window, on a loss that
    alternates between 0.5 and 0.8 step by step, with a 20× jump at step 121."""
    losses = [0.5 if step % 2 else 0.8 for step in range(1, 201)]
    losses[120] *= 20.0
    for window in (15, 16):
        rows = spike_rows(losses, spike_window=window, spike_threshold=6.0)
        assert [r["step"] for r in rows if r["loss_spike"]] == [121]


# --- no host sync ------------------------------------------------------------------------


def test_observe_makes_no_host_sync(no_cpu_branch: None) -> None:
    model = Net()
    clipper = NormClip(model.parameters(), max_norm=0.1)
    partial = NormClip([q for n, q in model.named_parameters() if n != "head.bias"], max_norm=0.1)
    monitor = GradMonitor(model, log_every=50)
    losses = [backward(model, seed=s) for s in range(1)]
    with no_host_sync():
        for _ in range(6):
            monitor.observe(clipper.clip_(), loss=losses[0], lr=0.1)
            monitor.observe(partial.clip_(), loss=losses[0].double())
            monitor.observe()
        model.head.bias.grad = None
        monitor.observe()
        monitor.observe(clipper.clip_())
    assert monitor._rows == 20
    assert monitor.summary().steps == 20


# --- arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"log_every": 0}, ValueError, "log_every must be an int >= 1; got 0"),
        ({"log_every": True}, ValueError, "log_every must be an int >= 1; got True"),
        ({"modules": "all"}, ValueError, "got 'all'"),
        ({"modules": 0}, ValueError, "module depth must be >= 1; got 0"),
        ({"modules": ["nope"]}, ValueError, "no monitored parameter is in module 'nope'"),
        ({"writers": [42]}, TypeError, "got 42"),
        (
            {"writers": 42},
            TypeError,
            "writers must be a Writer, a callable, or a list of them; got int 42",
        ),
        (
            {"writers": "log.csv"},
            TypeError,
            "not a path; got 'log.csv': use "
            r"writers=\[CSVWriter\(path\)\]",
        ),
        ({"writers": Path("log.csv")}, TypeError, "not a path"),
        ({"writers": [CSVWriter]}, TypeError, "got the class CSVWriter itself: create one"),
        ({"per_layer": "no"}, TypeError, "per_layer must be True or False; got 'no'"),
        ({"per_layer": 1}, TypeError, "per_layer must be True or False; got 1"),
        ({"norm_type": -1.0}, ValueError, "norm_type must be > 0 or inf; got -1.0"),
        ({"spike_window": 2}, ValueError, "spike window must be an int >= 3; got 2"),
        ({"spike_threshold": 0}, ValueError, "spike threshold must be a finite number > 0; got 0"),
        (
            {"spike_min_history": 2},
            ValueError,
            r"spike_min_history must be in \[3, spike_window=100\]; got 2",
        ),
        (
            {"spike_window": 16, "spike_min_history": 20},
            ValueError,
            r"spike_min_history must be in \[3, spike_window=16\]; got 20",
        ),
        (
            {"spike_min_history": 5.0},
            ValueError,
            "spike_min_history must be an int or None; got 5.0",
        ),
        ({"spike_min_history": True}, ValueError, "must be an int or None; got True"),
        (
            {"spike_window": 2, "spike_min_history": 3},
            ValueError,
            "spike window must be an int >= 3",
        ),
        ({"spike_rel_floor": 0}, ValueError, "spike_rel_floor must be a finite number > 0; got 0"),
        (
            {"spike_rel_floor": -0.1},
            ValueError,
            "spike_rel_floor must be a finite number > 0; got -0.1",
        ),
        (
            {"spike_rel_floor": math.inf},
            ValueError,
            "spike_rel_floor must be a finite number > 0; got inf",
        ),
        (
            {"spike_rel_floor": math.nan},
            ValueError,
            "spike_rel_floor must be a finite number > 0; got nan",
        ),
        (
            {"spike_rel_floor": True},
            ValueError,
            "spike_rel_floor must be a finite number > 0; got True",
        ),
        (
            {"spike_rel_floor": "0.1"},
            ValueError,
            "spike_rel_floor must be a finite number > 0; got '0.1'",
        ),
    ],
)
def test_bad_arguments_name_the_value(kwargs: dict, error: type, message: str) -> None:
    if "\\" not in message:  # a plain message: match it literally
        message = message.replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(error, match=message):
        GradMonitor(Net(), **kwargs)


def test_no_parameters() -> None:
    with pytest.raises(ValueError, match="no parameters to monitor"):
        GradMonitor(iter([]))
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters to monitor"):
        GradMonitor(frozen)


def test_plain_tensors_and_pairs() -> None:
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.zeros(3)
    rows = record({}, [lambda m: m.observe()], [a, b])
    assert rows[0]["param/params[0]"] == 5.0 and rows[0]["param/params[1]"] == 0.0
    assert not any(k.startswith("module/") for k in rows[0])  # root-owned only
    rows = record({}, [lambda m: m.observe()], [("enc.w", a), ("dec.w", b)])
    assert rows[0]["module/enc"] == 5.0 and rows[0]["module/dec"] == 0.0


def test_mismatched_stats_are_rejected() -> None:
    model = Net()
    backward(model)
    stats = NormClip(model.parameters(), max_norm=1.0).clip_()
    from dataclasses import replace

    with pytest.raises(ValueError, match="norms but 0 params"):
        GradMonitor(model).observe(replace(stats, params=()))


# --- gradclip.grad_norm is the tutorial's compute_grad_norm --------------------------------


def tutorial_compute_grad_norm(model: nn.Module) -> float:
    """The tutorial's helper, verbatim in substance: one .item() per parameter."""
    total_norm = 0.0
    for p in model.parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            total_norm += param_norm.item() ** 2
    return total_norm**0.5


def test_grad_norm_fits_the_tutorials_compute_grad_norm() -> None:
    from gradclip.norms import grad_norm

    model = Net()
    backward(model, scale=3.0)
    model.head.bias.grad = None  # parameters without gradients are skipped by both
    ours = grad_norm(model)
    assert isinstance(ours, torch.Tensor) and ours.dim() == 0  # float(...) gives the number
    assert float(ours) == pytest.approx(tutorial_compute_grad_norm(model), rel=1e-6)
    rows = record({}, [lambda m: m.observe()], model)
    assert rows[0]["total_norm"] == pytest.approx(float(ours), rel=1e-6)
