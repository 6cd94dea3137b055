"""``gradclip.integrations.accelerate.clip_`` with a real ``accelerate.Accelerator`` on CPU.

The training loops record the gradients before ``clip_`` and what the optimizer's
update uses (torch step hooks on the optimizer inside the ``AcceleratedOptimizer``);
expected gradients come from ``clip_reference``. Also here: ``import gradclip``
leaves every framework unimported (checked in a fresh interpreter).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType
from torch import Tensor, nn
from torch.amp.grad_scaler import OptState

from gradclip.clippers.compose import chain
from gradclip.clippers.fixed import NormClip
from gradclip.integrations.accelerate import clip_
from gradclip.spec import from_spec
from integrations.clip_reference import check_steps

LR = 0.1
SCALE = 2.0**8


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    """Accelerate keeps process-wide state; every test starts from none."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))


def batches(n: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 6, generator=gen), torch.randn(4, 2, generator=gen) * 3) for _ in range(n)
    ]


def fp16_accelerator(**kwargs: Any) -> Accelerator:
    """fp16 AMP with a real GradScaler on CPU (accelerate enables it only on GPUs)."""
    accelerator = Accelerator(cpu=True, mixed_precision="fp16", **kwargs)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    accelerator.native_amp = True
    return accelerator


def run(
    accelerator: Accelerator, spec: str, steps: int = 4, *, measure_first: bool = False
) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]], list[Any]]:
    """A plain loop: backward, record, clip_, step. Returns names, records, steps, stats."""
    model = Tiny()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    names = [n for n, _ in model.named_parameters()]
    clipper = from_spec(spec, model.named_parameters())
    at_step: list[dict[str, Any]] = []
    inner = optimizer.optimizer

    def pre(*_: Any) -> None:
        at_step.append(
            {
                "grads": [p.grad.clone() for p in model.parameters()],
                "before": [p.detach().clone() for p in model.parameters()],
            }
        )

    def post(*_: Any) -> None:
        at_step[-1]["after"] = [p.detach().clone() for p in model.parameters()]

    inner.register_step_pre_hook(pre)
    inner.register_step_post_hook(post)
    records, stats = [], []
    for x, y in batches(steps):
        with accelerator.autocast():
            loss = F.mse_loss(model(x).float(), y) * 10
        accelerator.backward(loss)
        if measure_first:  # what a loop that also logs accelerate's own norm does
            accelerator.clip_grad_norm_(model.parameters(), float("inf"))
        scaler = accelerator.scaler
        records.append(
            {
                "grads": [p.grad.clone() for p in model.parameters()],
                "params": [p.detach().clone() for p in model.parameters()],
                "scale": None if scaler is None else scaler.get_scale(),
                "stage": None
                if scaler is None
                else scaler._per_optimizer_states[id(inner)]["stage"],
            }
        )
        stats.append(clip_(accelerator, clipper))
        if scaler is not None:
            assert scaler._per_optimizer_states[id(inner)]["stage"] is OptState.UNSCALED
            with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
                scaler.unscale_(inner)  # exactly once: a second unscale is refused
        optimizer.step()
        optimizer.zero_grad()
    return names, records, at_step, stats


@pytest.mark.parametrize("spec", ["norm:0.5", "agc:0.02", "zclip:z=0.5,warmup=2"])
def test_full_precision(spec: str) -> None:
    names, records, at_step, stats = run(Accelerator(cpu=True), spec)
    check_steps(spec, names, records, at_step, LR)
    assert [int(s.step) for s in stats] == [1, 2, 3, 4]


def test_bf16() -> None:
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    names, records, at_step, _ = run(accelerator, "autoclip:p=50")
    check_steps("autoclip:p=50", names, records, at_step, LR)


@pytest.mark.parametrize("measure_first", [False, True])
def test_fp16_unscales_through_the_accelerator_once(measure_first: bool) -> None:
    """Scaled gradients are unscaled by clip_; already unscaled ones are left alone."""
    names, records, at_step, _ = run(fp16_accelerator(), "norm:0.5", measure_first=measure_first)
    stages = {r["stage"] for r in records}
    assert stages == ({OptState.UNSCALED} if measure_first else {OptState.READY})
    assert all(r["scale"] == SCALE for r in records)  # no overflow, no skipped step
    check_steps("norm:0.5", names, records, at_step, LR)


def test_gradient_accumulation_clips_once_per_optimizer_step() -> None:
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = Tiny()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    clipper = NormClip(model.parameters(), max_norm=0.5)
    results = []
    for x, y in batches(4):
        with accelerator.accumulate(model):
            accelerator.backward(F.mse_loss(model(x), y) * 10)
            stats = clip_(accelerator, clipper)
            results.append(stats)
            if stats is not None:  # the accumulated gradient of both micro-batches
                total = torch.linalg.vector_norm(
                    torch.cat([p.grad.flatten() for p in model.parameters()])
                )
                assert float(total) == pytest.approx(0.5, rel=1e-5) and bool(stats.clipped)
            optimizer.step()
            optimizer.zero_grad()
    assert [r is None for r in results] == [True, False, True, False]
    assert clipper.step == 2


def test_scaled_gradients_no_optimizer_holds() -> None:
    accelerator = fp16_accelerator()
    model = accelerator.prepare(Tiny())  # no optimizer prepared
    with accelerator.autocast():
        loss = model(torch.ones(2, 6)).float().sum()
    accelerator.backward(loss)
    with pytest.raises(ValueError, match="no optimizer prepared by this accelerator"):
        clip_(accelerator, NormClip(model.parameters(), max_norm=1.0))


def test_explicit_optimizer_argument() -> None:
    accelerator = fp16_accelerator()
    model = Tiny()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    with accelerator.autocast():
        loss = model(torch.ones(2, 6)).float().sum()
    accelerator.backward(loss)
    before = [p.grad.clone() / SCALE for p in model.parameters()]
    stats = clip_(accelerator, NormClip(model.parameters(), max_norm=1e9), optimizer)
    assert stats is not None and not bool(stats.clipped)
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize(
    ("kind", "fsdp2", "message"),
    [
        (DistributedType.DEEPSPEED, False, "DeepSpeed clips inside its engine"),
        (DistributedType.FSDP, False, "FSDP1: its flat sharded gradients"),
        (DistributedType.XLA, False, "XLA gradients are reduced"),
    ],
)
def test_refused_setups(kind: DistributedType, fsdp2: bool, message: str) -> None:
    # A stand-in: these setups need GPUs, TPUs or DeepSpeed; clip_ refuses them up front.
    attributes = {"distributed_type": kind, "is_fsdp2": fsdp2, "sync_gradients": True}
    stand_in = type("StandIn", (Accelerator,), attributes)
    fake = stand_in.__new__(stand_in)  # an Accelerator whose setup is never run
    with pytest.raises(ValueError, match=message):
        clip_(fake, NormClip([nn.Parameter(torch.zeros(1))], max_norm=1.0))


def test_bad_arguments_name_the_value() -> None:
    accelerator = Accelerator(cpu=True)
    model = Tiny()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    clipper = NormClip(model.parameters(), max_norm=1.0)
    with pytest.raises(TypeError, match=r"accelerator must be an accelerate\.Accelerator; got str"):
        clip_("acc", clipper)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"spec string 'norm:1\.0'.*gradclip\.from_spec\('norm:1\.0', model"
    ):
        clip_(accelerator, "norm:1.0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"gradclip Clipper .* or a chain; got Tiny"):
        clip_(accelerator, model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"a list or tuple of them, or None; got Tiny"):
        clip_(accelerator, clipper, model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"a list or tuple of them, or None; got list"):
        clip_(accelerator, clipper, [optimizer, model])  # type: ignore[list-item]
    assert all(p.grad is None for p in model.parameters())  # nothing ran
    model(torch.ones(2, 6)).sum().backward()
    stats = clip_(accelerator, chain(NormClip(model.parameters(), max_norm=1.0)), [optimizer])
    assert stats is not None and float(stats.clipped_norm) == pytest.approx(1.0, rel=1e-5)


def test_missing_accelerate_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name.split(".")[0] == "accelerate":
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "accelerate", None)
    monkeypatch.delitem(sys.modules, "gradclip.integrations.accelerate")
    with pytest.raises(ImportError, match=r"Hugging Face Accelerate.*pip install 'gradclip\[hf\]'"):
        importlib.import_module("gradclip.integrations.accelerate")


def test_import_gradclip_imports_no_framework() -> None:
    code = (
        "import sys, gradclip, gradclip.integrations, gradclip.integrations._adapters\n"
        "heavy = ('lightning', 'pytorch_lightning', 'lightning_fabric', 'transformers', 'accelerate')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout
