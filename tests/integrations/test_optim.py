"""attach(): clipping before optimizer.step(), the "skip" policy, folding into fused kernels.

References used here never come from the code under test: the "skip" policy is
compared with a run in which the poisoned batch was removed (bit-identical), the
folded clip with ``torch.nn.utils.clip_grad_norm_`` followed by a plain or fused step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradclip
import gradclip._sync
from gradclip.clippers.adagc import AdaGC
from gradclip.clippers.agc import AGC
from gradclip.clippers.autoclip import AutoClip
from gradclip.clippers.base import Clipper
from gradclip.clippers.compose import Chain, chain
from gradclip.clippers.emaratio import EMARatio
from gradclip.clippers.fixed import NormClip
from gradclip.clippers.schedule import Constant, Cosine, LinearWarmup, RelaxOnCalm, Schedule
from gradclip.clippers.stats import ClipStats
from gradclip.clippers.value import ValueClip
from gradclip.clippers.zclip import ZClip
from gradclip.integrations.optim import attach, clipping
from gradclip.nonfinite import NonFiniteGradientError
from sync_guard import no_host_sync

MAX_NORM = 0.3
Batch = tuple[torch.Tensor, torch.Tensor]

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda ps, fused: torch.optim.Adam(ps, lr=1e-2, fused=fused),
    "adamw": lambda ps, fused: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=fused),
    "sgd": lambda ps, fused: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=fused),
}


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def make_batches(n: int, seed: int = 1) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(n)]


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[Batch],
    *,
    scaler: torch.amp.GradScaler | None = None,
    poison: dict[int, float] | None = None,
    zero_grad: bool = True,
) -> None:
    """A plain (or AMP) loop; ``poison[i] = v`` writes v into one gradient of batch i."""
    poison = poison or {}
    for i, (x, y) in enumerate(batches):
        loss = F.mse_loss(model(x), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if i in poison:
            with torch.no_grad():
                model[0].weight.grad[1, 2] = poison[i]
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if zero_grad:
            optimizer.zero_grad()


def assert_bit_identical(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    """Parameters and every tensor of the optimizer state (``step`` included) are equal."""
    for pa, pb in zip(
        [p for g in a.param_groups for p in g["params"]],
        [p for g in b.param_groups for p in g["params"]],
    ):
        assert torch.equal(pa, pb)
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for name in sa[k]:
            va, vb = sa[k][name], sb[k][name]
            assert torch.equal(torch.as_tensor(va), torch.as_tensor(vb)), (k, name)


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


# -- the "skip" policy -----------------------------------------------------------------


CLIPPERS: dict[str, Callable[[nn.Module], Clipper | Chain]] = {
    "norm": lambda m: NormClip(m.parameters(), MAX_NORM),
    # Step-dependent: the threshold follows the host step count (a schedule in
    # progress; AdaGC's warm-up), so a skipped step must not count.
    "scheduled": lambda m: NormClip(m.parameters(), MAX_NORM, schedule=LinearWarmup(8)),
    "adagc": lambda m: AdaGC(m.parameters(), lambda_abs=MAX_NORM, warmup_steps=3),
    "chain": lambda m: chain(AGC(m.parameters(), 0.05), NormClip(m.parameters(), MAX_NORM)),
    "chain-scheduled": lambda m: chain(
        AGC(m.parameters(), 0.05), NormClip(m.parameters(), MAX_NORM, schedule=LinearWarmup(8))
    ),
}
SYNC_FREE_ON_FUSED = ("norm", "chain")  # fused: skipped through found_inf, the call counts
POISONS = {"nan": math.nan, "huge": 1e36}  # huge: finite, but its norm overflows float32


@pytest.mark.parametrize("kind", list(CLIPPERS))
@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("amp", [False, True], ids=["plain", "grad-scaler"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_skip_is_bit_identical_to_removing_the_batch(
    name: str, fused: bool, amp: bool, poison: str, kind: str
) -> None:
    batches = make_batches(6)
    bad = 2  # inside the warm-ups: a skip that counted as a step would shift them
    runs = []
    for poisoned in (True, False):
        model = make_model()
        opt = OPTIMIZERS[name](model.parameters(), fused)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if amp else None
        clipper = CLIPPERS[kind](model)
        handle = attach(opt, clipper, scaler=scaler)
        if poisoned:
            train(model, opt, batches, scaler=scaler, poison={bad: POISONS[poison]})
        else:
            train(model, opt, batches[:bad] + batches[bad + 1 :], scaler=scaler)
        runs.append((opt, handle, clipper, scaler))
    (opt_a, handle_a, clipper_a, scaler_a), (opt_b, handle_b, clipper_b, _) = runs
    assert_bit_identical(opt_a, opt_b)
    if amp and poison == "nan":
        # The scaler sees the NaN and skips by itself: its skips are the scaler's to count.
        assert scaler_a is not None and scaler_a.get_scale() < 2.0**12
        assert int(handle_a.skipped_steps) == 0
    else:
        # Only the clip sees it (a finite gradient whose norm overflows): gradclip skips.
        assert scaler_a is None or scaler_a.get_scale() == 2.0**12
        assert int(handle_a.skipped_steps) == 1
    assert int(handle_b.skipped_steps) == 0
    assert handle_a.folded == (fused and isinstance(clipper_a, NormClip))
    # A step decided on the host is rolled back for the clipper (members included);
    # the sync-free fused skip counts the call.
    extra = int(fused and kind in SYNC_FREE_ON_FUSED)
    assert clipper_a.step == clipper_b.step + extra
    if isinstance(clipper_a, Chain) and isinstance(clipper_b, Chain):
        for member_a, member_b in zip(clipper_a, clipper_b):
            assert member_a.step == member_b.step + extra


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_skip_counts_and_reports_each_skipped_step(fused: bool, value: float) -> None:
    model = make_model()
    opt = OPTIMIZERS["adam"](model.parameters(), fused)
    seen: list[ClipStats] = []

    class Recorder:
        def observe(self, stats: ClipStats) -> None:
            seen.append(stats)

    handle = attach(opt, NormClip(model.parameters(), MAX_NORM), monitor=Recorder())
    train(model, opt, make_batches(7), poison={2: value, 5: value})
    assert int(handle.skipped_steps) == 2
    assert handle.steps == len(seen) == 7
    assert [bool(s.finite) for s in seen] == [True, True, False, True, True, False, True]
    assert handle.last_stats is seen[-1]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_unfused_skip_hides_the_gradients_only_during_the_step() -> None:
    model = make_model()
    opt = OPTIMIZERS["sgd"](model.parameters(), False)
    handle = attach(opt, NormClip(model.parameters(), MAX_NORM))
    train(model, opt, make_batches(1))
    x, y = make_batches(1, seed=4)[0]
    F.mse_loss(model(x), y).backward()
    model[2].bias.grad[0] = math.inf
    grads = [p.grad for p in model.parameters()]
    seen: list[object] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(model[0].weight.grad))  # after ours
    opt.step()
    assert seen == [None]  # the step saw no gradients, so it updated nothing
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))  # given back
    assert int(handle.skipped_steps) == 1


def test_skip_on_the_first_fused_sgd_step_leaves_no_garbage_momentum() -> None:
    # torch's own found_inf skip on a first fused SGD step keeps torch.empty_like
    # momentum buffers; attach decides that step on the host instead.
    batches = make_batches(4)
    runs = []
    for poisoned in (True, False):
        model = make_model()
        opt = OPTIMIZERS["sgd"](model.parameters(), True)
        attach(opt, NormClip(model.parameters(), MAX_NORM))
        if poisoned:
            train(model, opt, batches, poison={0: math.inf})
        else:
            train(model, opt, batches[1:])
        runs.append(opt)
    assert_bit_identical(*runs)


def test_host_skip_rolls_the_clipper_step_back_but_keeps_its_state() -> None:
    batches = make_batches(5)
    runs = []
    for poisoned in (True, False):
        model = make_model()
        opt = OPTIMIZERS["adam"](model.parameters(), False)
        clipper = AutoClip(model.parameters(), percentile=50, history="full")
        attach(opt, clipper)
        if poisoned:
            train(model, opt, batches, poison={3: math.nan})
        else:
            train(model, opt, batches[:3] + batches[4:])
        runs.append((opt, clipper))
    (opt, clipper), (opt_ref, clipper_ref) = runs
    assert clipper.step == clipper_ref.step == 4
    for a, b in zip(clipper.state_dict()["state"], clipper_ref.state_dict()["state"]):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    assert_bit_identical(opt, opt_ref)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_other_policies(fused: bool) -> None:
    # "ignore": torch's behaviour, the NaN reaches the parameters.
    model = make_model()
    opt = OPTIMIZERS["sgd"](model.parameters(), fused)
    attach(opt, NormClip(model.parameters(), MAX_NORM), nonfinite="ignore")
    train(model, opt, make_batches(2), poison={1: math.nan})
    assert torch.isnan(model[0].weight).any()
    # "raise": nothing changes, the error names the parameter.
    model = make_model()
    opt = OPTIMIZERS["adam"](model.parameters(), fused)
    clipper = NormClip(model.named_parameters(), MAX_NORM)
    attach(opt, clipper, nonfinite="raise")
    train(model, opt, make_batches(2))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteGradientError, match=r"0\.weight"):
        train(model, opt, make_batches(1), poison={0: math.inf})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert clipper.step == 2 and clipper.nonfinite == "ignore"
    # "zero": the step runs with zero gradients (plain SGD without momentum: no change).
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=fused)
    attach(opt, NormClip(model.parameters(), MAX_NORM), nonfinite="zero")
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, make_batches(1), poison={0: math.nan})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -- folding into fused optimizers -----------------------------------------------------


@pytest.mark.parametrize("reference_fused", [False, True], ids=["ref-unfused", "ref-fused"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_folded_clip_matches_clip_then_step(name: str, reference_fused: bool) -> None:
    batches = make_batches(8)
    model = make_model()
    opt = OPTIMIZERS[name](model.parameters(), True)
    handle = attach(opt, NormClip(model.parameters(), MAX_NORM))
    model_ref = make_model()
    opt_ref = OPTIMIZERS[name](model_ref.parameters(), reference_fused)
    clipped = 0
    for x, y in batches:
        F.mse_loss(model(x), y).backward()
        opt.step()
        assert handle.folded
        F.mse_loss(model_ref(x), y).backward()
        total = torch.nn.utils.clip_grad_norm_(model_ref.parameters(), MAX_NORM)
        clipped += int(total > MAX_NORM)
        torch.testing.assert_close(handle.last_stats.total_norm, total, rtol=1e-5, atol=0)
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
    assert clipped >= 4  # the threshold was active on most steps
    for p, q in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_folded_clip_keeps_an_adaptive_clippers_state_as_clip_does() -> None:
    batches = make_batches(8)
    model, model_ref = make_model(), make_model()
    opt = OPTIMIZERS["adamw"](model.parameters(), True)
    clipper = AutoClip(model.parameters(), percentile=30, history="full")
    handle = attach(opt, clipper)
    opt_ref = OPTIMIZERS["adamw"](model_ref.parameters(), False)
    clipper_ref = AutoClip(model_ref.parameters(), percentile=30, history="full")
    for x, y in batches:
        F.mse_loss(model(x), y).backward()
        opt.step()
        F.mse_loss(model_ref(x), y).backward()
        stats = clipper_ref.clip_()
        opt_ref.step()
        torch.testing.assert_close(handle.last_stats.threshold, stats.threshold, rtol=1e-5, atol=0)
        torch.testing.assert_close(handle.last_stats.scale, stats.scale, rtol=1e-5, atol=0)
        opt.zero_grad()
        opt_ref.zero_grad()
    assert handle.folded and clipper.step == clipper_ref.step == len(batches)
    for p, q in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_folded_step_leaves_gradients_to_the_kernel() -> None:
    """No pass of its own: attach does not write the gradients; the fused kernel does.

    Observable behaviour: when the step begins, ``p.grad`` still holds the unclipped
    gradient and ``optimizer.grad_scale`` is ``1 / scale``; after the step ``p.grad``
    holds the clipped gradient, which torch's fused kernel stores back in its pass.
    """
    model = make_model()
    opt = OPTIMIZERS["adamw"](model.parameters(), True)
    handle = attach(opt, NormClip(model.parameters(), MAX_NORM))
    x, y = make_batches(1)[0]
    F.mse_loss(model(x), y).backward()
    raw = grads_of(model)
    seen: dict[str, Any] = {}

    def spy(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        seen["grads"] = grads_of(model)
        seen["grad_scale"] = optimizer.grad_scale.clone()  # type: ignore[attr-defined]

    opt.register_step_pre_hook(spy)  # runs after attach's hook
    with record_grad_writes(model) as writes:
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(seen["grads"], raw))
    scale = handle.last_stats.scale
    assert float(scale) < 1.0
    torch.testing.assert_close(seen["grad_scale"], 1 / scale)
    assert writes == ["_fused_adamw_"]  # nothing but the optimizer's kernel wrote a gradient
    for g, r in zip(grads_of(model), raw):
        torch.testing.assert_close(g, r * scale, rtol=1e-6, atol=0)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


@pytest.mark.parametrize("branch", [True, False], ids=["cpu-branch", "branch-free"])
def test_nothing_to_clip_sets_no_grad_scale_on_cpu(
    branch: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gradclip._sync, "branch_on_cpu", branch)
    model = make_model()
    opt = OPTIMIZERS["adamw"](model.parameters(), True)
    handle = attach(opt, NormClip(model.parameters(), 1e6))  # never clips
    seen: list[object] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(getattr(o, "grad_scale", None)))
    x, y = make_batches(1)[0]
    F.mse_loss(model(x), y).backward()
    raw = grads_of(model)
    opt.step()
    assert handle.folded and float(handle.last_stats.scale) == 1.0
    if branch:  # the CPU shortcut: nothing handed to the kernel, which stores nothing
        assert seen == [None]
    else:  # the accelerator path stays branch-free: grad_scale = 1
        assert torch.equal(seen[0], torch.tensor(1.0))  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(raw, grads_of(model)))


class _GradWrites(TorchDispatchMode):
    """Records the ops that write into any of the given tensors' memory."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.ptrs = {t.untyped_storage().data_ptr() for t in tensors}
        self.writes: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        schema = func._schema
        for arg, value in zip(
            schema.arguments,
            list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args) :]],
        ):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            values = value if isinstance(value, list | tuple) else [value]
            if any(
                isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() in self.ptrs
                for v in values
            ):
                self.writes.append(func.overloadpacket.__name__)
                break
        return func(*args, **kwargs)


class record_grad_writes:  # noqa: N801 - used like a function
    def __init__(self, model: nn.Module) -> None:
        self.mode = _GradWrites([p.grad for p in model.parameters()])

    def __enter__(self) -> list[str]:
        self.mode.__enter__()
        return self.mode.writes

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)


def test_the_write_recorder_sees_an_explicit_clip() -> None:
    # The recorder can fail: an unfused clip-then-step writes the gradients itself.
    model = make_model()
    x, y = make_batches(1)[0]
    F.mse_loss(model(x), y).backward()
    with record_grad_writes(model) as writes:
        gradclip.clip_grad_norm_(model.parameters(), MAX_NORM)
    assert writes and "_fused_adamw_" not in writes


@pytest.mark.parametrize(
    "make_clipper",
    [
        lambda m: ValueClip(m.parameters(), 0.01),  # per-element: no single scale
        lambda m: NormClip(  # two groups, two scales
            [{"params": m[0].parameters()}, {"params": m[2].parameters(), "max_norm": 0.1}],
            MAX_NORM,
        ),
        lambda m: NormClip(m[0].parameters(), MAX_NORM),  # part of the optimizer's params
    ],
    ids=["value", "two-groups", "subset"],
)
def test_unfoldable_clippers_clip_in_place_on_fused_optimizers(
    make_clipper: Callable[[nn.Module], Clipper],
) -> None:
    batches = make_batches(5)
    model, model_ref = make_model(), make_model()
    opt = OPTIMIZERS["adam"](model.parameters(), True)
    handle = attach(opt, make_clipper(model))
    opt_ref = OPTIMIZERS["adam"](model_ref.parameters(), True)
    clipper_ref = make_clipper(model_ref)
    for i, (x, y) in enumerate(batches):
        F.mse_loss(model(x), y).backward()
        if i == 2:
            with torch.no_grad():
                model[0].weight.grad[0, 0] = math.nan
        opt.step()
        assert not handle.folded
        opt.zero_grad()
        if i != 2:
            F.mse_loss(model_ref(x), y).backward()
            clipper_ref.clip_()
            opt_ref.step()
            opt_ref.zero_grad()
    assert int(handle.skipped_steps) == 1
    assert_bit_identical(opt, opt_ref)


# -- AMP ---------------------------------------------------------------------------------


def _scaled_step_grads(
    fused: bool, unscale_first: bool, autocast: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """After one attached scaler.step: the gradients, the reference, and the clip scale."""
    model = make_model()
    opt = OPTIMIZERS["sgd"](model.parameters(), fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    handle = attach(opt, NormClip(model.parameters(), MAX_NORM), scaler=scaler)
    x, y = make_batches(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = F.mse_loss(model(x).float(), y)
    scaler.scale(loss).backward()
    scaled = grads_of(model)
    # Reference: unscale as torch does, then clip (the same clipper type, by itself).
    inv = torch.tensor(2.0**10).double().reciprocal().float()
    reference = [g * inv for g in scaled]
    ref_params = [nn.Parameter(torch.zeros_like(g)) for g in reference]
    for p, g in zip(ref_params, reference):
        p.grad = g
    NormClip(ref_params, MAX_NORM).clip_()
    if unscale_first:
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert handle.folded == fused
    torch.testing.assert_close(
        handle.last_stats.total_norm,
        torch.linalg.vector_norm(torch.cat([g.flatten() for g in scaled])) * inv,
    )
    return grads_of(model), [p.grad for p in ref_params], handle.last_stats.scale


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_-then-step"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_grad_scaler_unscales_once_before_the_clip(
    fused: bool, unscale_first: bool, autocast: bool
) -> None:
    grads, reference, scale = _scaled_step_grads(fused, unscale_first, autocast)
    assert float(scale) < 1.0
    for g, r in zip(grads, reference):
        if fused:  # the kernel divides by grad_scale instead of multiplying by scale
            torch.testing.assert_close(g, r, rtol=1e-6, atol=0)
        else:
            assert torch.equal(g, r)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_grad_scaler_training_matches_explicit_unscale_clip_step(fused: bool) -> None:
    batches = make_batches(6)
    model, model_ref = make_model(), make_model()
    opt = OPTIMIZERS["adamw"](model.parameters(), fused)
    opt_ref = OPTIMIZERS["adamw"](model_ref.parameters(), fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    scaler_ref = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    attach(opt, NormClip(model.parameters(), MAX_NORM), scaler=scaler)
    clipper_ref = NormClip(model_ref.parameters(), MAX_NORM)
    for x, y in batches:
        scaler.scale(F.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scaler_ref.scale(F.mse_loss(model_ref(x), y)).backward()
        scaler_ref.unscale_(opt_ref)  # the documented AMP recipe, clipping by hand
        clipper_ref.clip_()
        scaler_ref.step(opt_ref)
        scaler_ref.update()
        opt_ref.zero_grad()
    assert scaler.get_scale() == scaler_ref.get_scale() > 2.0**8  # it grew, as documented
    for p, q in zip(model.parameters(), model_ref.parameters()):
        if fused:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(p, q)


UNFOLDABLE: dict[str, Callable[[nn.Module], Clipper | Chain]] = {
    "value": lambda m: ValueClip(m.parameters(), 0.01),
    "chain": lambda m: chain(AGC(m[0].parameters(), 0.05), NormClip(m.parameters(), MAX_NORM)),
}


@pytest.mark.parametrize("kind", list(UNFOLDABLE))
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_grad_scaler_with_an_unfoldable_clipper(fused: bool, kind: str) -> None:
    # The clip needs unscaled gradients in place: attach unscales once (for a fused
    # optimizer, in place of the kernel's division) and the result is bit-identical to
    # the documented recipe scaler.unscale_(); clip; scaler.step().
    batches = make_batches(4)
    model, model_ref = make_model(), make_model()
    opt = OPTIMIZERS["adam"](model.parameters(), fused)
    opt_ref = OPTIMIZERS["adam"](model_ref.parameters(), fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaler_ref = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    handle = attach(opt, UNFOLDABLE[kind](model), scaler=scaler)
    clipper_ref = UNFOLDABLE[kind](model_ref)
    for x, y in batches:
        scaler.scale(F.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scaler_ref.scale(F.mse_loss(model_ref(x), y)).backward()
        scaler_ref.unscale_(opt_ref)
        clipper_ref.clip_()
        scaler_ref.step(opt_ref)
        scaler_ref.update()
        opt_ref.zero_grad()
    assert not handle.folded and handle.steps == 4
    assert_bit_identical(opt, opt_ref)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_a_step_the_scaler_skips_leaves_the_clipper_state_alone(fused: bool) -> None:
    model = make_model()
    opt = OPTIMIZERS["adam"](model.parameters(), fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    clipper = AutoClip(model.parameters(), percentile=50, history="full")
    handle = attach(opt, clipper, scaler=scaler)
    train(model, opt, make_batches(2), scaler=scaler)
    state = copy.deepcopy(clipper.state_dict())
    train(model, opt, make_batches(1, seed=5), scaler=scaler, poison={0: math.inf})
    assert scaler.get_scale() == 2.0**7  # the scaler saw the inf and backed off
    after = clipper.state_dict()
    for a, b in zip(state["state"], after["state"]):
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    # Unfused: the scaler never calls the step, so the clipper is not called at all.
    # Fused: the clip runs inside the step (its tensor state masks the inf) and its
    # host step counter counts the call; attach does not count the scaler's skip.
    assert clipper.step == (3 if fused else 2)
    assert handle.steps == (3 if fused else 2)
    assert int(handle.skipped_steps) == 0


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_skip_under_a_scaler_for_what_only_the_clip_sees(fused: bool) -> None:
    # Finite gradients whose norm overflows float32: the scaler lets them through,
    # the clip's norm is inf, and "skip" skips the step.
    model = make_model()
    opt = OPTIMIZERS["adam"](model.parameters(), fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    handle = attach(opt, NormClip(model.parameters(), MAX_NORM), scaler=scaler)
    train(model, opt, make_batches(2), scaler=scaler)
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    x, y = make_batches(1, seed=5)[0]
    scaler.scale(F.mse_loss(model(x), y)).backward()
    with torch.no_grad():
        model[0].weight.grad.fill_(1e36)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**8  # the scaler did not skip
    assert int(handle.skipped_steps) == 1
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = opt.state_dict()["state"]
    for k, s in before["state"].items():
        for name, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(after[k][name]))


def test_stepping_around_the_scaler_is_an_error() -> None:
    model = make_model()
    opt = OPTIMIZERS["sgd"](model.parameters(), False)
    scaler = torch.amp.GradScaler("cpu")
    attach(opt, NormClip(model.parameters(), MAX_NORM), scaler=scaler)
    x, y = make_batches(1)[0]
    scaler.scale(F.mse_loss(model(x), y)).backward()
    with pytest.raises(RuntimeError, match=r"scaler\.step\(optimizer\)"):
        opt.step()


# -- attach / detach, the context form, monitors ----------------------------------------


def test_detach_stops_clipping() -> None:
    model, model_ref = make_model(), make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(model_ref.parameters(), lr=0.1)
    handle = attach(opt, NormClip(model.parameters(), MAX_NORM))
    assert handle.attached
    train(model, opt, make_batches(1), zero_grad=False)
    assert torch.linalg.vector_norm(
        torch.cat([g.flatten() for g in grads_of(model)])
    ) <= MAX_NORM * (1 + 1e-6)
    opt.zero_grad()
    handle.remove()
    handle.detach()  # idempotent
    assert not handle.attached
    for m, o in ((model, opt), (model_ref, opt_ref)):
        o.zero_grad()
        F.mse_loss(m(make_batches(1)[0][0]), make_batches(1)[0][1]).backward()
    raw = grads_of(model)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(raw, grads_of(model)))
    assert handle.steps == 1
    # The optimizer can be attached to again.
    attach(opt, NormClip(model.parameters(), MAX_NORM)).remove()


def test_handle_is_a_context_manager() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with attach(opt, NormClip(model.parameters(), MAX_NORM)) as handle:
        train(model, opt, make_batches(2))
    assert handle.steps == 2 and not handle.attached
    train(model, opt, make_batches(1))
    assert handle.steps == 2
    assert "NormClip on SGD" in repr(handle)


def test_clipping_context_attaches_to_the_optimizer_that_owns_the_params() -> None:
    model, other = make_model(), make_model(seed=3)
    batches = make_batches(3)
    model_ref = make_model()
    with clipping(NormClip(model.parameters(), MAX_NORM)) as handle:
        assert handle.optimizer is None
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # built "elsewhere"
        opt_other = torch.optim.SGD(other.parameters(), lr=0.1)
        train(model, opt, batches)
        F.mse_loss(other(batches[0][0]), batches[0][1]).backward()
        raw = grads_of(other)
        opt_other.step()
        assert all(torch.equal(a, b) for a, b in zip(raw, grads_of(other)))  # not clipped
    assert handle.optimizer is opt and handle.steps == 3
    opt_ref = torch.optim.Adam(model_ref.parameters(), lr=1e-2)
    clipper_ref = NormClip(model_ref.parameters(), MAX_NORM)
    for x, y in batches:
        F.mse_loss(model_ref(x), y).backward()
        clipper_ref.clip_()
        opt_ref.step()
        opt_ref.zero_grad()
    assert_bit_identical(opt, opt_ref)
    train(model, opt, batches[:1])  # outside the block: no longer clipped
    assert handle.steps == 3


def test_gradmonitor_observes_each_step() -> None:
    monitor_mod = pytest.importorskip("gradclip.monitor")
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    monitor = monitor_mod.GradMonitor(model, log_every=4)
    attach(opt, NormClip(model.parameters(), MAX_NORM), monitor=monitor)
    train(model, opt, make_batches(4), poison={1: math.nan})
    assert monitor.step == 4


def test_a_failing_step_leaves_the_optimizer_clean() -> None:
    class Flaky:
        calls = 0

        def observe(self, stats: ClipStats) -> None:
            self.calls += 1
            if self.calls == 2:
                raise OSError("disk full")

    batches = make_batches(4)
    model, model_ref = make_model(), make_model()
    opt = OPTIMIZERS["adamw"](model.parameters(), True)
    attach(opt, NormClip(model.parameters(), MAX_NORM), monitor=Flaky())
    opt_ref = OPTIMIZERS["adamw"](model_ref.parameters(), True)
    attach(opt_ref, NormClip(model_ref.parameters(), MAX_NORM))
    train(model, opt, batches[:1])
    with pytest.raises(OSError, match="disk full"):
        train(model, opt, batches[1:2], poison={0: math.nan})
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    opt.zero_grad()
    train(model, opt, batches[2:])
    train(model_ref, opt_ref, batches[:1] + batches[2:])
    for p, q in zip(model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_closure_optimizers_clip_each_evaluation() -> None:
    model, model_ref = make_model(), make_model()
    x, y = make_batches(1)[0]
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    opt_ref = torch.optim.LBFGS(model_ref.parameters(), lr=0.5, max_iter=3)
    handle = attach(opt, NormClip(model.parameters(), MAX_NORM), nonfinite="ignore")
    clipper_ref = NormClip(model_ref.parameters(), MAX_NORM)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    def closure_ref() -> torch.Tensor:
        opt_ref.zero_grad()
        loss = F.mse_loss(model_ref(x), y)
        loss.backward()
        clipper_ref.clip_()
        return loss

    opt.step(closure)
    opt_ref.step(closure_ref)
    assert handle.steps == clipper_ref.step >= 2
    for p, q in zip(model.parameters(), model_ref.parameters()):
        assert torch.equal(p, q)
    skipping = make_model()
    opt = torch.optim.LBFGS(skipping.parameters())
    attach(opt, NormClip(skipping.parameters(), MAX_NORM))
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: F.mse_loss(skipping(x), y))


# -- chains ----------------------------------------------------------------------------------


def make_chain(model: nn.Module) -> Chain:
    """Unit-wise AGC on the body, a cap on the head, an adaptive cap on everything."""
    return chain(
        AGC(model[0].named_parameters(prefix="0"), 0.05),
        NormClip(model[2].named_parameters(prefix="2"), 0.2),
        AutoClip(model.named_parameters(), percentile=50, history="full"),
    )


@pytest.mark.parametrize("context", [False, True], ids=["attach", "clipping"])
@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_a_chain_clips_as_chain_clip_then_step(fused: bool, context: bool) -> None:
    batches = make_batches(6)
    model, model_ref = make_model(), make_model()
    clipper, clipper_ref = make_chain(model), make_chain(model_ref)
    opt_ref = OPTIMIZERS["adamw"](model_ref.parameters(), fused)
    if context:
        with clipping(clipper) as handle:
            opt = OPTIMIZERS["adamw"](model.parameters(), fused)
            train(model, opt, batches)
    else:
        opt = OPTIMIZERS["adamw"](model.parameters(), fused)
        handle = attach(opt, clipper)
        train(model, opt, batches)
    clipped = 0
    for x, y in batches:
        F.mse_loss(model_ref(x), y).backward()
        stats = clipper_ref.clip_()
        clipped += int(stats.clipped)
        opt_ref.step()
        opt_ref.zero_grad()
    assert clipped == len(batches)  # the chain did something at every step
    assert handle.steps == len(batches) and not handle.folded
    assert handle.last_stats is not None
    for name in ("total_norm", "clipped_norm", "threshold", "scale"):
        assert torch.equal(getattr(handle.last_stats, name), getattr(stats, name)), name
    assert_bit_identical(opt, opt_ref)
    state, state_ref = clipper.state_dict(), clipper_ref.state_dict()
    assert state["step"] == state_ref["step"] == len(batches)
    for member, member_ref in zip(state["members"], state_ref["members"]):
        assert member["step"] == member_ref["step"]
        for a, b in zip(member["state"], member_ref["state"]):
            for key in a:
                assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_a_chain_raises_before_any_member_runs(fused: bool) -> None:
    # The NaN is in the second member's parameters: with the member policies, the first
    # member would already have clipped its gradients when the second one raised.
    model = make_model()
    opt = OPTIMIZERS["adam"](model.parameters(), fused)
    clipper = make_chain(model)
    attach(opt, clipper, nonfinite="raise")
    train(model, opt, make_batches(2))
    x, y = make_batches(1, seed=3)[0]
    F.mse_loss(model(x), y).backward()
    model[2].bias.grad[1] = math.inf
    grads, params = grads_of(model), [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteGradientError, match=r"2\.bias"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_of(model)))
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert clipper.step == 2 and [m.step for m in clipper] == [2, 2, 2]
    assert all(m.nonfinite == "ignore" for m in clipper)


def test_a_chain_zeroes_every_gradient_it_binds() -> None:
    # Disjoint members: the NaN is in the first one's set, and the second one's
    # gradients are zeroed too (the policy follows the chain's result).
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = chain(AGC(model[0].parameters(), 0.05), NormClip(model[2].parameters(), 0.2))
    handle = attach(opt, clipper, nonfinite="zero")
    seen: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(grads_of(model)))  # after ours
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, make_batches(1), poison={0: math.nan})
    assert all(torch.equal(g, torch.zeros_like(g)) for g in seen[0])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    stats = handle.last_stats
    assert stats is not None and not bool(stats.finite)
    assert float(stats.clipped_norm) == float(stats.scale) == 0.0


def test_a_chain_member_with_a_conflicting_policy_is_refused() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = chain(
        AGC(model.parameters(), 0.05), NormClip(model.parameters(), 1.0, nonfinite="zero")
    )
    with pytest.raises(
        ValueError,
        match=r"chain member NormClip has nonfinite='zero' but attach got nonfinite='skip'",
    ):
        attach(opt, clipper)
    attach(opt, clipper, nonfinite="zero").remove()


# -- clippers that follow their step count -----------------------------------------------


class _Declared(NormClip):
    """A clipper of the user's that says whether it follows its step count."""

    def __init__(self, *args: Any, step_dependent: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._declared = step_dependent

    @property
    def step_dependent(self) -> bool:
        return self._declared


class _HalfAfter(Schedule):
    """A schedule of the user's: it does not say when it stops following the step."""

    def factor(self, step: int) -> float:
        return 1.0 if step < 2 else 0.5


def _syncs_on_step(clipper_of: Callable[[nn.Module], Clipper | Chain], warm: int) -> bool:
    """Whether a fused step, after ``warm`` clean ones, reads a value on the host."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    attach(opt, clipper_of(model))
    batches = make_batches(warm + 1)
    train(model, opt, batches[:warm])
    x, y = batches[warm]
    F.mse_loss(model(x), y).backward()
    try:
        with no_host_sync():
            opt.step()
    except AssertionError as error:
        assert "host read" in str(error)
        return True
    return False


@pytest.mark.parametrize(
    ("kind", "syncs"),
    [
        # (clipper, steps before the one checked) -> host sync expected
        ("warmup-running", True),
        ("warmup-over", False),
        ("cosine-running", True),
        ("cosine-over", False),
        ("constant", False),
        ("relax", False),
        ("adagc-running", True),
        ("adagc-over", False),
        ("emaratio-running", True),
        ("chain-running", True),
        ("chain-over", False),
        ("zclip", False),  # its warm-up counts finite norms on the device
        ("custom-schedule", True),  # assumed to follow the step, always
        ("declared", True),  # a clipper's own step_dependent property wins
        ("declared-not", False),
    ],
)
def test_step_dependent_clippers_decide_the_skip_on_the_host(
    no_cpu_branch: None, kind: str, syncs: bool
) -> None:
    def norm(schedule: Any) -> Callable[[nn.Module], Clipper]:
        return lambda m: NormClip(m.parameters(), MAX_NORM, schedule=schedule)

    cases: dict[str, tuple[Callable[[nn.Module], Clipper | Chain], int]] = {
        "warmup-running": (norm(LinearWarmup(3)), 2),  # index 2 < 3: still warming up
        "warmup-over": (norm(LinearWarmup(3)), 3),
        "cosine-running": (norm(Cosine(4)), 3),
        "cosine-over": (norm(Cosine(4)), 4),
        "constant": (norm(Constant(0.5)), 1),
        "relax": (norm(RelaxOnCalm(window=2)), 1),
        "adagc-running": (lambda m: AdaGC(m.parameters(), warmup_steps=3), 2),  # call 3 of 3
        "adagc-over": (lambda m: AdaGC(m.parameters(), warmup_steps=3), 3),
        "emaratio-running": (lambda m: EMARatio(m.parameters(), warmup_steps=2), 1),
        "chain-running": (
            lambda m: chain(AGC(m.parameters()), norm(LinearWarmup(3))(m)),
            2,
        ),
        "chain-over": (lambda m: chain(AGC(m.parameters()), norm(LinearWarmup(3))(m)), 3),
        "zclip": (lambda m: ZClip(m.parameters(), warmup_steps=3), 1),
        "custom-schedule": (norm(_HalfAfter()), 5),
        "declared": (lambda m: _Declared(m.parameters(), MAX_NORM, step_dependent=True), 5),
        "declared-not": (
            lambda m: _Declared(
                m.parameters(), MAX_NORM, schedule=LinearWarmup(9), step_dependent=False
            ),
            1,
        ),
    }
    clipper_of, warm = cases[kind]
    assert _syncs_on_step(clipper_of, warm) == syncs


# -- the sync-free fused path ------------------------------------------------------------


@pytest.mark.parametrize("clip", ["fold", "in-place"])
@pytest.mark.parametrize("poisoned", [False, True], ids=["finite", "nan"])
def test_fused_skip_makes_no_host_sync(no_cpu_branch: None, poisoned: bool, clip: str) -> None:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    clipper = (
        NormClip(model.parameters(), MAX_NORM)
        if clip == "fold"
        else ValueClip(model.parameters(), 0.01)
    )
    handle = attach(opt, clipper)
    batches = make_batches(2)
    train(model, opt, batches[:1])  # the first step creates the state (decided on the host)
    F.mse_loss(model(batches[1][0]), batches[1][1]).backward()
    if poisoned:
        with torch.no_grad():
            model[0].weight.grad[0, 0] = math.nan
    before = [p.detach().clone() for p in model.parameters()]
    with no_host_sync():
        opt.step()
    assert handle.folded == (clip == "fold")
    assert int(handle.skipped_steps) == int(poisoned)
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert changed != poisoned


def test_fused_step_with_a_grad_scaler_makes_no_host_sync(no_cpu_branch: None) -> None:
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    attach(opt, NormClip(model.parameters(), MAX_NORM), scaler=scaler)
    batches = make_batches(2)
    train(model, opt, batches[:1], scaler=scaler)
    scaler.scale(F.mse_loss(model(batches[1][0]), batches[1][1])).backward()
    with no_host_sync():
        scaler.step(opt)
    scaler.update()


def test_unfused_skip_is_one_host_sync(no_cpu_branch: None) -> None:
    # The documented cost: an unfused optimizer can only be skipped from the host.
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    attach(opt, NormClip(model.parameters(), MAX_NORM))
    x, y = make_batches(1)[0]
    F.mse_loss(model(x), y).backward()
    with pytest.raises(AssertionError, match="host read"), no_host_sync():
        opt.step()


# -- bad arguments -------------------------------------------------------------------------


def test_bad_arguments_name_the_value() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = NormClip(model.parameters(), MAX_NORM)
    with pytest.raises(
        ValueError, match=r"nonfinite must be one of ignore, raise, zero, skip; got 'drop'"
    ):
        attach(opt, clipper, nonfinite="drop")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer; got Sequential"):
        attach(model, clipper)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Clipper .*got function"):
        attach(opt, torch.nn.utils.clip_grad_norm_)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="GradScaler or None; got str"):
        attach(opt, clipper, scaler="cpu")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"observe\(stats\).*got list"):
        attach(opt, clipper, monitor=[])  # type: ignore[arg-type]
    stranger = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"parameters weight, bias are not in the SGD"):
        attach(opt, NormClip(stranger.named_parameters(), MAX_NORM))
    with pytest.raises(ValueError, match=r"nonfinite='raise' but attach got nonfinite='skip'"):
        attach(opt, NormClip(model.parameters(), MAX_NORM, nonfinite="raise"))
    handle = attach(opt, clipper)
    with pytest.raises(ValueError, match="already has a clipper attached"):
        attach(opt, NormClip(model.parameters(), MAX_NORM))
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="already attached"):
        attach(opt2, clipper)
    handle.remove()
    attach(opt2, clipper).remove()


def test_the_functional_api_cannot_skip() -> None:
    model = make_model()
    with pytest.raises(ValueError, match=r"got 'skip'.*only gradclip\.attach"):
        gradclip.clip_grad_norm_(model.parameters(), 1.0, nonfinite="skip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"got 'skip'.*only gradclip\.attach"):
        NormClip(model.parameters(), 1.0, nonfinite="skip")
