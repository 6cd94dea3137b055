"""The Lightning ``GradClip`` callback, with a real ``lightning.pytorch.Trainer`` on CPU.

What reaches ``optimizer.step`` is captured by torch optimizer step hooks; what the
callback started from is captured by a probe callback placed before it. The expected
gradients come from an independent reference where one exists (``torch.nn.utils``
for norm and value clipping, the unit-wise formula for AGC) and, for the stateful
strategies, from a separate instance of the same gradclip clipper driven with the
same pre-clip gradients and parameters (the strategies themselves are tested
against their papers' references in tests/clippers; here the question is whether
the callback applies them to the right gradients at the right time, once).
"""

from __future__ import annotations

import functools
import importlib
import math
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.amp.grad_scaler import OptState

from gradclip.clippers.fixed import NormClip
from gradclip.integrations.lightning import GradClip
from integrations.bad_specs import bad_specs
from integrations.clip_reference import check_steps

LR = 0.1
STEPS = 4


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*litlogger.*")
        yield


def loader() -> torch.utils.data.DataLoader[tuple[Tensor, ...]]:
    """12 fixed samples in batches of 4 (3 optimizer steps per epoch), no shuffling."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 6, generator=gen)
    y = torch.randn(12, 2, generator=gen) * 3
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


class Net(pl.LightningModule):
    """Two linear layers; records the gradients and parameters around every optimizer step."""

    def __init__(self, *, manual: bool = False, fused: bool = False, two_opts: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 2)
        self.automatic_optimization = not manual
        self.fused = fused
        self.two_opts = two_opts
        self.at_step: list[dict[str, Any]] = []  # one record per optimizer step

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x, y = batch
        loss = F.mse_loss(self.head(torch.tanh(self.body(x))).float(), y) * 10
        if self.automatic_optimization:
            return loss
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in opts:
            opt.step()
        return None

    def configure_optimizers(self) -> Any:
        def sgd(params: Any) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=LR, fused=self.fused or None)

        if self.two_opts:
            return [sgd(self.body.parameters()), sgd(self.head.parameters())]
        return sgd(self.parameters())

    def on_fit_start(self) -> None:
        for index, opt in enumerate(self.trainer.optimizers):
            opt.step = functools.partial(self._step, index, opt, opt.step)  # type: ignore[method-assign]
            opt.register_step_post_hook(functools.partial(self._post_step, index))

    def _step(self, index: int, opt: torch.optim.Optimizer, step: Any, closure: Any = None) -> Any:
        """Record what the update uses: after the closure (backward, hooks, clip) if any."""
        if closure is None:
            self._record(index, opt)
            return step()

        def recording_closure() -> Any:
            out = closure()
            self._record(index, opt)
            return out

        return step(recording_closure)

    def _record(self, index: int, opt: torch.optim.Optimizer) -> None:
        params = _params(opt)
        self.at_step.append(
            {
                "opt": index,
                "grads": [p.grad.detach().clone() for p in params],
                "before": [p.detach().clone() for p in params],
            }
        )

    def _post_step(self, index: int, opt: torch.optim.Optimizer, *_: Any) -> None:
        self.at_step[-1]["after"] = [p.detach().clone() for p in _params(opt)]


class PreClip(pl.Callback):
    """Put before GradClip: records what the callback starts from at each step."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        stage = None
        if scaler is not None:
            stage = scaler._per_optimizer_states[id(optimizer)]["stage"]
        params = _params(optimizer)
        self.records.append(
            {
                "grads": [p.grad.detach().clone() for p in params],
                "params": [p.detach().clone() for p in params],
                "scale": None if scaler is None else scaler.get_scale(),
                "stage": stage,
            }
        )


class StatsLog(pl.Callback):
    """Put after GradClip: copies its last ClipStats after every training batch."""

    def __init__(self, clip: GradClip) -> None:
        self.clip = clip
        self.stats: list[Any] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.stats.append(list(self.clip.last_stats))


class Recorder(Logger):
    """A logger that keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))


def _params(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": STEPS,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def scaler_plugin() -> MixedPrecision:
    """Real fp16 AMP with a loss scaler on CPU (Lightning itself only offers bf16 there)."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))


def check_run(spec: str, net: Net, probe: PreClip, steps: int = STEPS) -> None:
    """Gradients at every step are the strategy's output, and the SGD update used them."""
    assert len(probe.records) == steps
    names = [n for n, _ in net.named_parameters()]
    check_steps(spec, names, probe.records, net.at_step, LR)


SPECS = ["norm:0.5", "value:0.05", "agc:0.02", "zclip:z=0.5,warmup=2", "autoclip:p=50"]


@pytest.mark.parametrize("spec", SPECS)
def test_automatic_fp32_clips_as_the_strategy_says(tmp_path: Path, spec: str) -> None:
    net, probe, clip = Net(), PreClip(), GradClip(spec)
    trainer(tmp_path, [probe, clip]).fit(net, loader())
    check_run(spec, net, probe)
    assert clip.clippers[0].step == STEPS


@pytest.mark.parametrize(
    ("manual", "precision", "spec"),
    [
        (True, "32-true", "zclip:z=0.5,warmup=2"),
        (False, "bf16-mixed", "autoclip:p=50"),
        (True, "bf16-mixed", "agc:0.02"),
        (True, "bf16-mixed", "norm:0.5"),
    ],
)
def test_manual_and_bf16(tmp_path: Path, manual: bool, precision: str, spec: str) -> None:
    net, probe = Net(manual=manual), PreClip()
    trainer(tmp_path, [probe, GradClip(spec)], precision=precision).fit(net, loader())
    check_run(spec, net, probe)


@pytest.mark.parametrize(
    ("manual", "fused"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_fp16_scaler_unscales_exactly_once(tmp_path: Path, manual: bool, fused: bool) -> None:
    """Lightning unscales before the hook, except for fused optimizers: GradClip does then.

    The probe before GradClip sees the gradients Lightning hands over (scaled for a
    fused optimizer); the step sees the clip of the unscaled gradients, and the
    parameters move by exactly ``lr ×`` that (a second unscale, by GradClip or by
    the fused kernel through ``grad_scale``, would show here).
    """
    net, probe = Net(manual=manual, fused=fused), PreClip()
    run = trainer(tmp_path, [probe, GradClip("norm:0.5")], plugins=[scaler_plugin()])
    run.fit(net, loader())
    stages = {r["stage"] for r in probe.records}
    assert stages == ({OptState.READY} if fused else {OptState.UNSCALED})
    assert all(r["scale"] == 2.0**8 for r in probe.records)  # no overflow, no skipped step
    check_run("norm:0.5", net, probe)


def test_two_optimizers_get_their_own_clipper(tmp_path: Path) -> None:
    net, recorder = Net(manual=True, two_opts=True), Recorder()
    clip = GradClip("norm:0.1")
    trainer(tmp_path, [clip], logger=recorder, log_every_n_steps=1).fit(net, loader())
    assert len(clip.clippers) == 2
    body, head = (list(c.param_groups[0]["names"]) for c in clip.clippers)  # type: ignore[union-attr]
    assert body == ["body.weight", "body.bias"] and head == ["head.weight", "head.bias"]
    for step in net.at_step:  # each optimizer's own gradients have norm <= 0.1
        norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in step["grads"]]))
        assert norm <= 0.1 + 1e-6
    logged = set().union(*(m for _, m in recorder.rows))
    assert {"grad_norm_pre/opt0", "grad_norm_post/opt1", "grad_clip_rate/opt1"} <= logged


def test_factory_and_instance_strategies(tmp_path: Path) -> None:
    net, probe = Net(), PreClip()
    trainer(tmp_path, [probe, GradClip(functools.partial(NormClip, max_norm=0.5))]).fit(
        net, loader()
    )
    check_run("norm:0.5", net, probe)

    net, probe = Net(), PreClip()
    clip = GradClip(NormClip(net.named_parameters(), max_norm=0.5))
    trainer(tmp_path, [probe, clip]).fit(net, loader())
    check_run("norm:0.5", net, probe)

    net = Net(manual=True, two_opts=True)
    clip = GradClip(NormClip(net.parameters(), max_norm=0.5))
    with pytest.raises(ValueError, match="2 optimizers; pass a spec string or a factory"):
        trainer(tmp_path, [clip]).fit(net, loader())


def test_logs_norms_threshold_and_clip_rate(tmp_path: Path) -> None:
    """By default GradClip logs when Lightning writes (log_every_n_steps); the rate covers the window."""
    recorder = Recorder()
    clip = GradClip("norm:60")
    stats = StatsLog(clip)
    run = trainer(tmp_path, [clip, stats], logger=recorder, log_every_n_steps=2)
    run.fit(Net(), loader())
    rows = [(step, m) for step, m in recorder.rows if "grad_norm_pre" in m]
    assert [step for step, _ in rows] == [1, 3]  # optimizer steps 2 and 4
    per_step = [s[0] for s in stats.stats]
    clipped = [bool(s.clipped) for s in per_step]
    assert clipped == [False, True, True, True], "the windows must have rates 1/2 and 1"
    for (_, m), last in zip(rows, (1, 3)):
        s = per_step[last]
        assert m["grad_norm_pre"] == pytest.approx(float(s.total_norm))
        assert m["grad_norm_post"] == pytest.approx(float(s.clipped_norm))
        assert m["grad_clip_threshold"] == pytest.approx(60.0)
        assert m["grad_clip_rate"] == pytest.approx(sum(clipped[last - 1 : last + 1]) / 2)


def test_log_every_overrides_lightning(tmp_path: Path) -> None:
    recorder = Recorder()
    clip = GradClip("norm:2.0", log_every=1)
    stats = StatsLog(clip)
    run = trainer(tmp_path, [clip, stats], logger=recorder, log_every_n_steps=1)
    run.fit(Net(), loader())
    rows = [m for _, m in recorder.rows if "grad_norm_pre" in m]
    assert len(rows) == STEPS
    for m, s in zip(rows, stats.stats):
        assert m["grad_norm_pre"] == pytest.approx(float(s[0].total_norm))
        assert m["grad_clip_rate"] == float(bool(s[0].clipped))
    assert run.callback_metrics["grad_norm_post"] == stats.stats[-1][0].clipped_norm


def test_no_logging_with_log_every_zero(tmp_path: Path) -> None:
    recorder = Recorder()
    run = trainer(
        tmp_path, [GradClip("norm:0.5", log_every=0)], logger=recorder, log_every_n_steps=1
    )
    run.fit(Net(), loader())
    assert not any("grad_norm_pre" in m for _, m in recorder.rows)


def test_checkpoint_resume_restores_the_clipper_state(tmp_path: Path) -> None:
    """3 steps, save, resume for 3 more == 6 steps straight (state and weights bit-identical)."""
    spec = "zclip:z=0.5,warmup=2"
    straight = GradClip(spec)
    net_straight = Net()
    trainer(tmp_path, [straight], max_steps=-1, max_epochs=2).fit(net_straight, loader())

    first = GradClip(spec)
    run = trainer(tmp_path, [first], max_steps=-1, max_epochs=1)
    run.fit(Net(), loader())
    path = tmp_path / "one-epoch.ckpt"
    run.save_checkpoint(path)
    saved = first.clippers[0].state_dict()
    ckpt = torch.load(path, weights_only=True)
    assert_state_equal(ckpt["callbacks"][first.state_key], {"clippers": [saved]})

    class AtStart(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.state = resumed.clippers[0].state_dict()

    resumed, at_start = GradClip(spec), AtStart()
    net = Net()
    trainer(tmp_path, [resumed, at_start], max_steps=-1, max_epochs=2).fit(
        net, loader(), ckpt_path=path
    )
    assert_state_equal(at_start.state, saved)
    assert saved["step"] == 3 and resumed.clippers[0].step == 6
    assert_state_equal(resumed.clippers[0].state_dict(), straight.clippers[0].state_dict())
    for a, b in zip(net.parameters(), net_straight.parameters()):
        assert torch.equal(a, b)


def assert_state_equal(a: Any, b: Any) -> None:
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b), (a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_state_equal(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


class HeadFirst(Net):
    """One optimizer whose param groups list the head before the body (not module order)."""

    def configure_optimizers(self) -> Any:
        groups = [{"params": self.head.parameters()}, {"params": self.body.parameters()}]
        return torch.optim.SGD(groups, lr=LR)


@pytest.mark.parametrize(
    ("algorithm", "value", "spec"), [("norm", 0.5, "norm:0.5"), ("value", 0.05, "value:0.05")]
)
def test_same_run_as_lightnings_own_clipping(
    tmp_path: Path, algorithm: str, value: float, spec: str
) -> None:
    """Trainer(gradient_clip_val=c) and GradClip("norm:c") train the same weights, bit for bit.

    Lightning clips the optimizer's parameters in param-group order; the callback binds
    them in that order too, so the total norm is summed alike (here not module order).
    """
    theirs, ours, probe = HeadFirst(), HeadFirst(), PreClip()
    trainer(
        tmp_path / "lightning", [], gradient_clip_val=value, gradient_clip_algorithm=algorithm
    ).fit(theirs, loader())
    trainer(tmp_path / "gradclip", [probe, GradClip(spec)]).fit(ours, loader())
    assert len(ours.at_step) == len(theirs.at_step) == STEPS
    for mine, lightning in zip(ours.at_step, theirs.at_step):
        assert all(map(torch.equal, mine["grads"], lightning["grads"]))
        assert all(map(torch.equal, mine["after"], lightning["after"]))
    # The clip was active: what GradClip started from differs from what the step used.
    assert any(
        not torch.equal(a, b)
        for record, step in zip(probe.records, ours.at_step)
        for a, b in zip(record["grads"], step["grads"])
    )


def test_refuses_gradient_clip_val(tmp_path: Path) -> None:
    run = trainer(tmp_path, [GradClip("norm:1.0")], gradient_clip_val=0.5)
    with pytest.raises(ValueError) as info:
        run.fit(Net(), loader())
    message = str(info.value)
    assert "GradClip('norm:1.0'" in message and "Trainer(gradient_clip_val=0.5)" in message
    assert "Leave gradient_clip_val unset (None)" in message


def test_warns_about_an_own_configure_gradient_clipping(tmp_path: Path) -> None:
    class OwnClipping(Net):
        def configure_gradient_clipping(self, *args: Any, **kwargs: Any) -> None:
            pass

    with pytest.warns(UserWarning, match="OwnClipping overrides configure_gradient_clipping"):
        trainer(tmp_path, [GradClip("norm:1.0")], max_steps=1).fit(OwnClipping(), loader())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [GradClip("norm:1.0")], max_steps=1).fit(Net(), loader())
    assert not [w for w in caught if "configure_gradient_clipping" in str(w.message)]


def test_works_with_the_pytorch_lightning_package(tmp_path: Path) -> None:
    ptl = pytest.importorskip("pytorch_lightning")
    clip = GradClip("norm:0.5")
    assert isinstance(clip, ptl.Callback) and isinstance(clip, pl.Callback)

    class Small(ptl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(6, 2)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            return F.mse_loss(self.layer(batch[0]), batch[1]) * 10

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR)

    ptl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[clip],
    ).fit(Small(), loader())
    stats = clip.last_stats[0]
    assert stats is not None and float(stats.clipped_norm) <= 0.5 + 1e-6 and bool(stats.clipped)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"unknown clipping strategy 'nope'.*valid: .*zclip"):
        GradClip("nope:1")
    with pytest.raises(TypeError, match=r"spec string like 'zclip:z=2.5'.*got int"):
        GradClip(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"log_every must be >= 0.*got -1"):
        GradClip("norm:1", log_every=-1)
    with pytest.raises(TypeError, match=r"log_every must be an int.*got 1.5"):
        GradClip("norm:1", log_every=1.5)  # type: ignore[arg-type]


BAD_SPECS = bad_specs("GradClip")


@pytest.mark.parametrize(("spec", "error", "message"), BAD_SPECS, ids=[s for s, _, _ in BAD_SPECS])
def test_spec_options_are_checked_at_construction(
    spec: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        GradClip(spec)
    # Options that name parameters are checked when the clipper is bound to them.
    GradClip("agc:0.01,exclude=head.*")


def test_missing_lightning_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in ("lightning", "pytorch_lightning"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lightning", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    monkeypatch.delitem(sys.modules, "gradclip.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'gradclip\[lightning\]'"):
        importlib.import_module("gradclip.integrations.lightning")
