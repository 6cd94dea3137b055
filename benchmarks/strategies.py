"""Stateful strategies vs the peer packages (zclip, autoclip, smartclip): per-step time.

Run from the repository root::

    python -m benchmarks.strategies            # about 3-4 minutes on 2 idle cores
    python -m benchmarks.strategies --quick    # about a minute, noisier

(Both take two to three times as long when other jobs load the machine.)

Workloads (from :mod:`benchmarks.clip`): GPT-2-small-shaped gradients (124M float32
in 148 tensors) and 500 tensors of 32x32. A stateful clipper's step depends on its
state, so every clipper is first driven through a realistic norm sequence, then timed
on steps that alternate a **calm** gradient set (the saved gradients: below every
adaptive threshold) and a **spike** set (the same gradients times 10: above it).
Reported: per-step medians (calm, spike, and a step = the mean of a calm and a spike
call), as ratios:

* gradclip's ZClip and AutoClip against the fastest comparable peer class
  (targets: <= 1.0 on GPT-2 small, <= 0.7 on the small tensors);
* every gradclip strategy against ``torch.nn.utils.clip_grad_norm_`` on the small
  tensors (target <= 1.2);
* bounded AutoClip's step at step 50,000 against step 1,000 on the same gradients
  (target <= 1.2; the exact full-history mode's growth is reported too).

Appends (or replaces) its section of ``benchmarks/RESULTS.md``, between markers,
leaving the other sections alone. See :mod:`benchmarks.common` for the method and the
module docstring of each helper below for what exactly is timed.
"""

from __future__ import annotations

import argparse
import ast
import cProfile
import functools
import gc
import os
import pstats
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import autoclip.torch as autoclip_torch
import smartclip
import torch
import zclip
from torch import Tensor

import gradclip
from benchmarks.clip import Workload, gpt2_small_shapes, make_workload, small_shapes
from benchmarks.common import (
    Fn,
    Samples,
    format_ms,
    machine_info,
    markdown_table,
    markers,
    restore_,
    write_section,
)
from gradclip.clippers.adagc import AdaGC
from gradclip.clippers.agc import AGC
from gradclip.clippers.autoclip import AutoClip
from gradclip.clippers.compose import chain
from gradclip.clippers.emaratio import EMARatio
from gradclip.clippers.fixed import NormClip
from gradclip.clippers.value import ValueClip
from gradclip.clippers.zclip import ZClip

BEGIN, END = markers("strategies")

SPIKE = 10.0
"""A spike gradient is the calm one times this."""
JITTER = 0.05
"""Calm norms while driving a clipper: the calm norm times exp(N(0, JITTER^2))."""
DRIVE_SPIKE_EVERY = 100
"""While warming up, every 100th norm is a spike (1 %)."""
WARM_STEPS = 1000
"""Steps a clipper is driven through before timing (fills AutoClip's 1000-norm window)."""
REAL_WARM_STEPS = 120
"""Full-gradient warm-up steps of per-tensor strategies (AdaGC's warm-up is 100)."""
BLOCK = 2
"""Timed rounds between two fills (one calm and one spike step)."""
FILL = 20
"""Calm steps each history-based clipper takes between blocks (untimed)."""
PERCENTILE = 90.0
"""AutoClip's percentile: calm norms lie below it, spikes above (autoclip's default 0.9)."""
WINDOW = 1000
"""History length of every windowed clipper (autoclip's and gradclip's default)."""
GROWTH_EARLY, GROWTH_LATE = 1_000, 50_000

TARGET_PEER = {"gpt2": 1.0, "small": 0.7}
TARGET_TORCH = 1.2
TARGET_GROWTH = 1.2
TARGET_CHAIN = 1.10
"""A chain's own cost: at most 10% over its members' ``clip_()`` calls made by hand.

The chain combines its members' stats with a dozen 0-d tensor ops (about 40 µs, 3% of
AGC then NormClip on 500 small tensors, measured by timing the members inside a chain)."""


# ---------------------------------------------------------------------------
# Implementations


@dataclass
class Impl:
    """One clipper and the call that is timed.

    Attributes:
        name: the label in the report.
        fn: one clipping step on the live gradients.
        package: ``gradclip``, ``torch``, ``zclip``, ``autoclip`` or ``smartclip``.
        timed: what ``fn`` calls, for the report.
        family: ``"zclip"`` or ``"autoclip"``: which peer comparison it belongs to.
        drive: its state depends only on the global norm sequence, so it is warmed up
            and kept realistic (fills) through one small gradient of that norm.
        real_warmup: warmed up with full gradients (per-tensor state).
        per_tensor: scales tensors by different factors (clipping is detected by
            comparing every gradient, not one).
        matches: the gradclip implementation configured to compute the same scales
            (checked on every timed step).
        strategies: how many strategies each gradient goes through (a chain of two
            members on the same parameters: 2). Only single-strategy steps have the
            per-strategy target against torch.
        by_hand: for a chain, the reference that applies its members one after the
            other (the chain's overhead is checked against it).
    """

    name: str
    fn: Fn
    package: str
    timed: str
    family: str | None = None
    drive: bool = False
    real_warmup: bool = False
    per_tensor: bool = False
    matches: str | None = None
    strategies: int = 1
    by_hand: str | None = None


def peer_impls(work: Workload) -> list[Impl]:
    """gradclip's ZClip and AutoClip and the comparable classes of the peer packages."""
    params = work.params
    model = torch.nn.ParameterList(params)  # the module zclip and smartclip want
    q = PERCENTILE / 100.0
    gz = ZClip(params)
    gaw = AutoClip(params, PERCENTILE, history="window", window=WINDOW, include_current=False)
    gaf = AutoClip(params, PERCENTILE, history="full", include_current=False)
    pz = zclip.ZClip(max_grad_norm=None)  # the paper's method: no fixed cap
    sz = smartclip.ZScoreClip()  # zmax 3, ema_decay 0.99
    qc = autoclip_torch.QuantileClip(
        params, quantile=q, history_length=WINDOW, global_threshold=True
    )
    sc = autoclip_torch.StandardClip(
        params, deviations=2.0, history_length=WINDOW, global_threshold=True
    )
    sp = smartclip.AutoClip(
        mode="percentile", history="window", percentile=PERCENTILE, window_size=WINDOW
    )
    sa = smartclip.AutoClip(mode="auto")
    smart = "smartclip.apply(model, clipper) (the clip in smartclip.step, without the optimizer)"
    return [
        Impl("gradclip ZClip", gz.clip_, "gradclip", "ZClip(params).clip_()", "zclip", True),
        Impl(
            "zclip.ZClip",
            lambda: pz.step(model),
            "zclip",
            "ZClip(max_grad_norm=None).step(model)",
            "zclip",
            True,
            matches="gradclip ZClip",
        ),
        Impl(
            "smartclip.ZScoreClip",
            lambda: smartclip.apply(model, sz),
            "smartclip",
            f"ZScoreClip() (mean + 3 std of EMAs): {smart}",
            "zclip",
            True,
        ),
        Impl(
            "gradclip AutoClip (window)",
            gaw.clip_,
            "gradclip",
            f"AutoClip(params, {PERCENTILE:g}, history='window', window={WINDOW}, "
            "include_current=False).clip_()",
            "autoclip",
            True,
        ),
        Impl(
            "gradclip AutoClip (full)",
            gaf.clip_,
            "gradclip",
            f"AutoClip(params, {PERCENTILE:g}, history='full', include_current=False).clip_()",
            "autoclip",
            True,
        ),
        Impl(
            "autoclip.QuantileClip",
            qc.step,
            "autoclip",
            f"QuantileClip(params, quantile={q:g}, history_length={WINDOW}, "
            "global_threshold=True).step()",
            "autoclip",
            True,
            matches="gradclip AutoClip (window)",
        ),
        Impl(
            "autoclip.StandardClip",
            sc.step,
            "autoclip",
            f"StandardClip(params, deviations=2.0, history_length={WINDOW}, "
            "global_threshold=True).step()",
            "autoclip",
            True,
        ),
        Impl(
            "smartclip.AutoClip (percentile)",
            lambda: smartclip.apply(model, sp),
            "smartclip",
            f"AutoClip(mode='percentile', history='window', percentile={PERCENTILE:g}, "
            f"window_size={WINDOW}): {smart}",
            "autoclip",
            True,
        ),
        Impl(
            "smartclip.AutoClip (auto)",
            lambda: smartclip.apply(model, sa),
            "smartclip",
            f"AutoClip(mode='auto') (median + 3 std): {smart}",
            "autoclip",
            True,
        ),
    ]


def norm_pass_impls(work: Workload) -> list[Impl]:
    """The bare norm pass two ways (information): torch's fused norm, and BLAS dot products."""
    grads = work.grads  # the same tensor objects every call restores into

    def dots() -> Tensor:
        return torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in grads]).sum().sqrt()

    return [
        Impl(
            "(info) norm pass: _foreach_norm",
            lambda: torch._foreach_norm(grads),
            "info",
            "torch._foreach_norm(grads): the per-tensor norms gradclip and torch compute",
        ),
        Impl(
            "(info) norm pass: dot",
            dots,
            "info",
            "torch.dot(g, g) per tensor, summed: the sum of squares smartclip computes",
        ),
        Impl(
            "(info) norm pass: blocked",
            lambda: gradclip.tensor_norms(grads, kernel="blocked"),
            "info",
            "gradclip.tensor_norms(grads, kernel='blocked'): the per-tensor norms of "
            "gradclip's adaptive strategies",
        ),
    ]


def strategy_impls(work: Workload) -> list[Impl]:
    """torch's ``clip_grad_norm_`` and the gradclip strategies not in :func:`peer_impls`."""
    params = work.params
    c = work.total_norm
    cap = 2.0 * c  # calm norms pass, spikes are clipped
    calm_max = max(float(g.abs().max()) for g in work.saved)
    head = params[-1:]
    body = params[:-1]
    head_cap = 2.0 * float(work.saved[-1].norm())
    torch_norm = torch.nn.utils.clip_grad_norm_
    nc = NormClip(params, cap)
    vc = ValueClip(params, calm_max)
    agc = AGC(params, 0.01)
    gas = AutoClip(params, PERCENTILE, history="stream", include_current=False)
    ada = AdaGC(params, lambda_abs=cap)
    ema = EMARatio(params)
    emat = EMARatio(params, per_tensor=True)
    split = chain(AGC(body, 0.01), NormClip(head, head_cap))
    stacked = chain(AGC(params, 0.01), NormClip(params, cap))
    agc_alone, cap_alone = AGC(params, 0.01), NormClip(params, cap)

    def by_hand() -> None:
        agc_alone.clip_()
        cap_alone.clip_()

    capped = chain(ZClip(params), NormClip(params, cap))
    body_cap = 2.0 * float(torch.stack([g.norm() for g in work.saved[:-1]]).norm())
    plain = chain(NormClip(body, body_cap), NormClip(head, head_cap))
    return [
        Impl(
            "torch clip_grad_norm_",
            lambda: torch_norm(params, cap),
            "torch",
            "torch.nn.utils.clip_grad_norm_(params, 2·calm norm)",
        ),
        Impl("gradclip NormClip", nc.clip_, "gradclip", "NormClip(params, 2·calm norm).clip_()"),
        Impl(
            "gradclip ValueClip",
            vc.clip_,
            "gradclip",
            "ValueClip(params, largest calm |gradient|).clip_()",
            per_tensor=True,
        ),
        Impl("gradclip AGC", agc.clip_, "gradclip", "AGC(params, 0.01).clip_()", per_tensor=True),
        Impl(
            "(info) clip_grad_agc_",
            lambda: gradclip.clip_grad_agc_(params, 0.01),
            "info",
            "gradclip.clip_grad_agc_(params, 0.01): the stateless function, no stats",
            per_tensor=True,
        ),
        Impl(
            "gradclip AutoClip (stream)",
            gas.clip_,
            "gradclip",
            f"AutoClip(params, {PERCENTILE:g}, history='stream', include_current=False).clip_()",
            drive=True,
        ),
        Impl(
            "gradclip AdaGC",
            ada.clip_,
            "gradclip",
            "AdaGC(params, lambda_abs=2·calm norm).clip_()",
            real_warmup=True,
            per_tensor=True,
        ),
        Impl("gradclip EMARatio", ema.clip_, "gradclip", "EMARatio(params).clip_()", drive=True),
        Impl(
            "gradclip EMARatio (per tensor)",
            emat.clip_,
            "gradclip",
            "EMARatio(params, per_tensor=True).clip_()",
            real_warmup=True,
            per_tensor=True,
        ),
        Impl(
            "gradclip chain (AGC body, NormClip head)",
            split.clip_,
            "gradclip",
            "chain(AGC(params[:-1], 0.01), NormClip(params[-1:], 2·its calm norm)).clip_()",
            per_tensor=True,
        ),
        Impl(
            "gradclip chain (AGC, NormClip)",
            stacked.clip_,
            "gradclip",
            "chain(AGC(params, 0.01), NormClip(params, 2·calm norm)).clip_()",
            per_tensor=True,
            strategies=2,
            by_hand="(info) AGC, then NormClip, by hand",
        ),
        Impl(
            "(info) AGC, then NormClip, by hand",
            by_hand,
            "info",
            "AGC(params, 0.01).clip_(); NormClip(params, 2·calm norm).clip_(): the chain's "
            "members applied one after the other",
            per_tensor=True,
        ),
        Impl(
            "gradclip chain (ZClip, NormClip)",
            capped.clip_,
            "gradclip",
            "chain(ZClip(params), NormClip(params, 2·calm norm)).clip_()",
            drive=True,
            strategies=2,
        ),
        Impl(
            "gradclip chain (NormClip body, NormClip head)",
            plain.clip_,
            "gradclip",
            "chain(NormClip(params[:-1], 2·their calm norm), NormClip(params[-1:], "
            "2·its calm norm)).clip_(): the chain's own cost",
            per_tensor=True,
        ),
    ]


def growth_impls(work: Workload, quick: bool) -> tuple[list[Impl], dict[str, int]]:
    """AutoClip per history mode, one to be driven to step 1,000 and one to 50,000."""
    impls: list[Impl] = []
    steps: dict[str, int] = {}
    modes = ("window",) if quick else ("window", "stream", "full")
    for mode in modes:
        for at in (GROWTH_EARLY, GROWTH_LATE):
            clipper = AutoClip(work.params, PERCENTILE, history=mode, include_current=False)
            name = f"{mode} @ {at:,}"
            timed = f"AutoClip(params, {PERCENTILE:g}, history={mode!r}).clip_()"
            impls.append(Impl(name, clipper.clip_, "gradclip", timed, drive=True))
            steps[name] = at
    return impls, steps


# ---------------------------------------------------------------------------
# Norm sequences and driving a clipper's state


def calm_factors(count: int, gen: torch.Generator, spikes: bool = False) -> list[float]:
    """Calm norms as multiples of the calm norm; with ``spikes``, every 100th times 10."""
    factors = torch.randn(count, generator=gen, dtype=torch.float64).mul_(JITTER).exp_()
    if spikes:
        factors[DRIVE_SPIKE_EVERY - 1 :: DRIVE_SPIKE_EVERY] *= SPIKE
    return [float(f) for f in factors]


def driver_index(work: Workload) -> int:
    """The smallest gradient: it carries the driven norms, and it is the clipping probe."""
    sizes = [g.numel() for g in work.saved]
    return sizes.index(min(sizes))


@contextmanager
def single_gradient(work: Workload) -> Iterator[Callable[[float], None]]:
    """Leave one small gradient in place of all of them; yield a setter of its norm.

    Every clipper driven this way keeps state that depends only on the global norm
    (ZClip's EMA, AutoClip's history, ...), and every implementation skips
    parameters whose ``.grad`` is None, so a step with only this gradient, of norm
    ``n``, moves the state exactly as a full step of norm ``n`` would, at a fraction
    of the cost. The gradients are put back (the same tensors) afterwards.
    """
    params = work.params
    index = driver_index(work)
    kept = [p.grad for p in params]
    direction = work.saved[index] / work.saved[index].norm()
    buf = torch.empty_like(direction)
    for p in params:
        p.grad = None
    params[index].grad = buf

    def set_norm(norm: float) -> None:
        torch.mul(direction, norm, out=buf)

    try:
        yield set_norm
    finally:
        for p, g in zip(params, kept):
            p.grad = g


def drive(impls: Sequence[Impl], work: Workload, norms: Sequence[float]) -> None:
    """Step every clipper through ``norms`` (one small gradient; see :func:`single_gradient`).

    Runs on one thread: the state updates are elementwise or sorts (the same results
    on any number of threads), and past torch's grain size (32,768 elements, AutoClip's
    full history after that many steps) an op on two threads of a busy 2-core machine
    waits milliseconds for the second one. Timing uses the default threads.
    """
    if not impls:
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with single_gradient(work) as set_norm:
            for norm in norms:
                for impl in impls:
                    set_norm(norm)
                    impl.fn()
    finally:
        torch.set_num_threads(threads)


def real_warmup(impls: Sequence[Impl], work: Workload, factors: Sequence[float]) -> None:
    """Step clippers with per-tensor state through calm full gradients (saved times f)."""
    grads = work.grads
    for f in factors:
        for impl in impls:
            restore_(grads, work.saved)
            torch._foreach_mul_(grads, f)
            impl.fn()


def prepare(
    impls: Sequence[Impl],
    work: Workload,
    gen: torch.Generator,
    steps: dict[str, int] | None = None,
) -> None:
    """Warm every stateful clipper up (driven, or with full gradients)."""
    c = work.total_norm
    driven = [i for i in impls if i.drive]
    if steps is None:
        drive(driven, work, [c * f for f in calm_factors(WARM_STEPS, gen, spikes=True)])
    else:  # one shared sequence; each clipper stops at its own step count
        norms = [c * f for f in calm_factors(max(steps.values()), gen, spikes=True)]
        done = 0
        for at in sorted(set(steps.values())):
            drive([i for i in driven if steps[i.name] >= at], work, norms[done:at])
            done = at
    real_warmup([i for i in impls if i.real_warmup], work, calm_factors(REAL_WARM_STEPS, gen))


# ---------------------------------------------------------------------------
# Timing: interleaved rounds alternating calm and spike gradients


@dataclass
class Phased:
    """Per-call seconds of every implementation, split into calm and spike calls.

    Round ``2k`` is calm and ``2k + 1`` a spike, both with the same rotation of the
    implementations' order, so the pair ``k`` is one calm and one spike call of each.

    Attributes:
        calm: the calm calls (aligned by round pair).
        spike: the spike calls.
        step: per round pair, the mean of its calm and spike call: a step of a run
            whose steps are half calm, half spikes.
        clipped: per implementation, the fraction of (calm, spike) calls that changed
            the gradients.
        scales: per implementation that scales all tensors alike, the factor each timed
            call applied (from the probe gradient).
    """

    calm: Samples
    spike: Samples
    step: Samples
    clipped: dict[str, tuple[float, float]]
    scales: dict[str, list[float]] = field(default_factory=dict)


def measure_phased(
    impls: Sequence[Impl],
    work: Workload,
    spiked: Sequence[Tensor],
    *,
    rounds: int,
    warmup_rounds: int,
    fill: Callable[[], None] | None,
) -> Phased:
    """Time every implementation ``rounds`` times, interleaved, restoring before each call.

    Like :func:`benchmarks.common.measure`, but the gradients restored before a call
    alternate between the calm set (``work.saved``) and ``spiked`` from round to
    round, and every :data:`BLOCK` rounds ``fill()`` runs (untimed).
    """
    rounds += rounds % 2
    grads = work.grads
    phases = (list(work.saved), list(spiked))
    probe = driver_index(work)
    probe_norms = [float(phase[probe].norm()) for phase in phases]
    names = [i.name for i in impls]
    times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    changed: dict[str, tuple[list[bool], list[bool]]] = {n: ([], []) for n in names}
    scales: dict[str, list[float]] = {i.name: [] for i in impls if not i.per_tensor}
    order = list(impls)

    def one_round(r: int, timed: bool) -> None:
        phase = r % 2
        shift = (r // 2) % len(order)
        saved = phases[phase]
        for impl in order[shift:] + order[:shift]:
            restore_(grads, saved)
            fn = impl.fn
            start = time.perf_counter_ns()
            fn()
            elapsed = (time.perf_counter_ns() - start) * 1e-9
            if not timed:
                continue
            times[impl.name][phase].append(elapsed)
            if impl.per_tensor:
                changed[impl.name][phase].append(
                    any(not torch.equal(g, s) for g, s in zip(grads, saved))
                )
            else:
                scale = float(grads[probe].norm()) / probe_norms[phase]
                scales[impl.name].append(scale)
                changed[impl.name][phase].append(not torch.equal(grads[probe], saved[probe]))

    for r in range(warmup_rounds):
        one_round(r, timed=False)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            if fill is not None and r and r % BLOCK == 0:
                fill()
                gc.collect()
            one_round(r, timed=True)
    finally:
        if gc_was_enabled:
            gc.enable()
    restore_(grads, work.saved)
    calm = {n: times[n][0] for n in names}
    spike = {n: times[n][1] for n in names}
    step = {n: [(a + b) / 2 for a, b in zip(calm[n], spike[n])] for n in names}
    clipped = {n: (statistics.fmean(changed[n][0]), statistics.fmean(changed[n][1])) for n in names}
    return Phased(Samples(calm), Samples(spike), Samples(step), clipped, scales)


def make_fill(impls: Sequence[Impl], work: Workload, gen: torch.Generator) -> Callable[[], None]:
    """Between blocks, :data:`FILL` calm driven steps for every history-based clipper.

    Timed rounds alternate calm and spike gradients, so without fills half the norms
    a clipper sees would be spikes; its history would fill with them and, by design,
    it would stop flagging them (AutoClip's 90th percentile, smartclip's EMA of raw
    norms). With fills, spikes are 1 of every 22 steps, as in a run with rare spikes.
    """
    driven = [i for i in impls if i.drive]
    c = work.total_norm

    def fill() -> None:
        drive(driven, work, [c * f for f in calm_factors(FILL, gen)])

    return fill


def spiked_copy(work: Workload) -> list[Tensor]:
    """The spike gradient set: the calm one times :data:`SPIKE`."""
    return [s * SPIKE for s in work.saved]


# ---------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Ratio:
    """One reported comparison with a target."""

    section: str
    workload: str
    name: str
    ref: str
    phased: Phased
    target: float | None
    what: str

    @property
    def value(self) -> float:
        """median(step of name) / median(step of ref)."""
        return self.phased.step.ratio(self.name, self.ref)

    @property
    def passed(self) -> bool | None:
        """Whether the target is met (None: no target)."""
        return None if self.target is None else self.value <= self.target


def step_ms(phased: Phased, name: str) -> float:
    """Median step of ``name``, seconds."""
    return phased.step.median(name)


def peer_ratios(workload: str, key: str, impls: Sequence[Impl], phased: Phased) -> list[Ratio]:
    """gradclip ZClip / AutoClip against the fastest peer of their family."""
    out: list[Ratio] = []
    for family in ("zclip", "autoclip"):
        peers = [i.name for i in impls if i.family == family and i.package != "gradclip"]
        fastest = min(peers, key=lambda n: step_ms(phased, n))
        for impl in impls:
            if impl.family == family and impl.package == "gradclip":
                out.append(
                    Ratio(
                        "peers",
                        workload,
                        impl.name,
                        fastest,
                        phased,
                        TARGET_PEER[key],
                        f"{impl.name} vs the fastest {family} peer ({fastest})",
                    )
                )
    for impl in impls:  # like with like: the peer configured to compute the same scales
        if impl.matches is not None:
            what = f"{impl.matches} vs {impl.name} (same algorithm and scales)"
            out.append(Ratio("peers", workload, impl.matches, impl.name, phased, None, what))
    return out


def torch_ratios(workload: str, impls: Sequence[Impl], phased: Phased) -> list[Ratio]:
    """Every gradclip step against torch's ``clip_grad_norm_``, and chains against by-hand.

    The target applies to one strategy per gradient; a chain of two strategies on the
    same parameters does two strategies' work and is shown for information, with its
    own target: no more than :data:`TARGET_CHAIN` times its members applied by hand.
    """
    ref = "torch clip_grad_norm_"
    out = []
    for i in impls:
        if i.package != "gradclip":
            continue
        target = TARGET_TORCH if i.strategies == 1 else None
        out.append(Ratio("torch", workload, i.name, ref, phased, target, f"{i.name} vs {ref}"))
        if i.by_hand is not None:
            what = f"{i.name} vs its members applied one after the other"
            out.append(Ratio("chain", workload, i.name, i.by_hand, phased, TARGET_CHAIN, what))
    return out


def growth_ratios(workload: str, impls: Sequence[Impl], phased: Phased) -> list[Ratio]:
    """Each history mode at step 50,000 against itself at step 1,000."""
    out = []
    for impl in impls:
        mode, at = impl.name.split(" @ ")
        if at != f"{GROWTH_LATE:,}":
            continue
        target = None if mode == "full" else TARGET_GROWTH
        early = f"{mode} @ {GROWTH_EARLY:,}"
        what = f"AutoClip history={mode!r}: step {GROWTH_LATE:,} vs step {GROWTH_EARLY:,}"
        out.append(Ratio("growth", workload, impl.name, early, phased, target, what))
    return out


def scale_check(impl: Impl, phased: Phased) -> str:
    """For a peer configured like a gradclip clipper: how far apart their scales were."""
    if impl.matches is None:
        return "—"
    mine, theirs = phased.scales[impl.matches], phased.scales[impl.name]
    worst = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(mine, theirs))
    return f"same scales as {impl.matches} (max rel. diff {worst:.0e}, {len(mine)} steps)"


# ---------------------------------------------------------------------------
# Profile of a gradclip step (for missed targets)


def profile_step(impl: Impl, work: Workload, calls: int) -> list[tuple[str, float, float]]:
    """cProfile ``calls`` calm-and-spike steps; the top entries by own time.

    Returns (function, own µs per step, calls per step), gradients restored outside
    the profiler.
    """
    grads = work.grads
    spiked = spiked_copy(work)
    prof = cProfile.Profile()
    for k in range(calls):
        restore_(grads, spiked if k % 2 else work.saved)
        prof.enable()
        impl.fn()
        prof.disable()
    restore_(grads, work.saved)
    stats = pstats.Stats(prof)
    rows = []
    for (path, line, func), (_, ncalls, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if path == "~":
            where = func
        elif func.startswith("<"):  # a comprehension: name the function it is in
            where = f"{_short(path)}:{line} {func} in {_enclosing(path, line)}"
        else:
            where = f"{_short(path)}:{line} {func}"
        rows.append((where, tottime / calls * 1e6, ncalls / calls))
    rows.sort(key=lambda row: -row[1])
    return rows


@functools.cache
def _functions(path: str) -> list[tuple[int, int, str]]:
    """(first line, last line, name) of every function defined in a source file."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return []
    return [
        (node.lineno, node.end_lineno or node.lineno, node.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def _enclosing(path: str, line: int) -> str:
    """The innermost function of ``path`` containing ``line`` ("?" if unknown)."""
    spans = [(b - a, name) for a, b, name in _functions(path) if a <= line <= b]
    return min(spans)[1] if spans else "?"


def _short(path: str) -> str:
    for marker in ("site-packages/", "src/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return os.path.basename(path)


# ---------------------------------------------------------------------------
# Report


def _status(r: Ratio) -> str:
    if r.passed is None:
        return "info"
    return "pass" if r.passed else "**FAIL**"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def times_table(impls: Sequence[Impl], phased: Phased) -> str:
    """Per-implementation medians, clipping counts and the cross-check."""
    header = [
        "implementation",
        "timed call",
        "calm (ms)",
        "spike (ms)",
        "step (ms)",
        "calls clipped: calm / spike",
        "check",
    ]
    rows = []
    for impl in impls:
        calm, spike = phased.clipped[impl.name]
        rows.append(
            [
                impl.name,
                "`" + impl.timed.replace("|", "\\|") + "`",  # GFM: escape pipes in cells
                format_ms(phased.calm.median(impl.name)),
                format_ms(phased.spike.median(impl.name)),
                format_ms(phased.step.median(impl.name)),
                f"{_pct(calm)} / {_pct(spike)}",
                scale_check(impl, phased),
            ]
        )
    return markdown_table(header, rows)


def ratio_table(ratios: Sequence[Ratio]) -> str:
    """The comparisons with targets."""
    header = [
        "workload",
        "comparison",
        "step ratio (median)",
        "per-round IQR",
        "calm / spike ratios",
        "target",
        "result",
        "ms (median step)",
    ]
    rows = []
    for r in ratios:
        q1, q3 = r.phased.step.paired_quartiles(r.name, r.ref)
        calm = r.phased.calm.ratio(r.name, r.ref)
        spike = r.phased.spike.ratio(r.name, r.ref)
        rows.append(
            [
                r.workload,
                r.what,
                f"**{r.value:.2f}×**",
                f"{q1:.2f}–{q3:.2f}",
                f"{calm:.2f} / {spike:.2f}",
                "—" if r.target is None else f"≤ {r.target:g}×",
                _status(r),
                f"{format_ms(step_ms(r.phased, r.name))} / {format_ms(step_ms(r.phased, r.ref))}",
            ]
        )
    return markdown_table(header, rows)


def profile_notes(profiles: dict[str, list[tuple[str, float, float]]]) -> str:
    """The top entries of each profiled gradclip step, as a list."""
    out = []
    for name, rows in profiles.items():
        total = sum(r[1] for r in rows)
        top = "; ".join(f"`{w}` {us:.0f} µs ({n:g}×)" for w, us, n in rows[:8])
        out.append(
            f"  - **{name}** (500 × 32×32, cProfile, own time per step, profiled total "
            f"{total:.0f} µs): {top}."
        )
    return "\n".join(out)


def _norm_pass(p: Phased) -> str:
    names = (
        "(info) norm pass: _foreach_norm",
        "(info) norm pass: dot",
        "(info) norm pass: blocked",
    )
    if not all(n in p.calm.times for n in names):
        return "not measured"
    fused, dot, blocked = (p.step.median(n) for n in names)
    return (
        f"`_foreach_norm` {format_ms(fused)} ms, `dot` {format_ms(dot)} ms, gradclip's "
        f"blocked kernel {format_ms(blocked)} ms (**{blocked / dot:.2f}×** `dot`)"
    )


def paired_difference(samples: Samples, name: str, base: str) -> float:
    """Median over rounds of ``name``'s time minus ``base``'s, in seconds.

    Both are timed in every round, back to back, so what slows a whole round (other
    jobs, frequency changes) cancels: this is the extra cost of ``name`` over ``base``.
    The difference of their medians is not: it mixes two distributions' noise.
    """
    return statistics.median(a - b for a, b in zip(samples.times[name], samples.times[base]))


def floor_notes(ratios: Sequence[Ratio]) -> list[str]:
    """What the missed targets could reach at best, from this run's numbers."""
    out: list[str] = []
    for r in ratios:
        if r.passed is False and r.section == "peers" and r.workload.startswith("GPT-2"):
            p = r.phased
            out.append(
                f"- {r.workload}, {r.name} vs {r.ref}: a calm step is one read of the "
                f"gradients for their norm ({format_ms(p.calm.median(r.name))} ms vs "
                f"{format_ms(p.calm.median(r.ref))} ms, **{p.calm.ratio(r.name, r.ref):.2f}×**); "
                "a spike step adds the scaling pass, the same in both "
                f"(spike ratio {p.spike.ratio(r.name, r.ref):.2f}×). "
                + (
                    "smartclip sums squares with `torch.dot` per tensor (BLAS); gradclip's "
                    "adaptive strategies use its blocked kernel (rows of 4096 elements, "
                    "their squares summed in float64), which reads the same bytes. The "
                    f"bare passes: {_norm_pass(p)}. "
                    if r.ref.startswith("smartclip")
                    else ""
                )
                + "Both read the gradients once for the norm and once more to scale them "
                "on a spike, so what remains of a gap is the norm kernel's (the bare passes "
                "above) and the per-step bookkeeping's."
            )
            continue
        if r.passed is not False or r.section not in ("peers", "torch"):
            continue
        p = r.phased
        med = p.step.median
        names = set(p.step.times)
        if r.section == "peers" and "gradclip NormClip" in names:
            base = med("gradclip NormClip")
            extra = paired_difference(p.step, r.name, "gradclip NormClip")
            budget = r.target * med(r.ref) - base
            out.append(
                f"- {r.workload}, {r.name} vs {r.ref}: `NormClip` (the same `Clipper.clip_` "
                "path with a constant threshold and no state: the base's norm pass, "
                f"bookkeeping, scaling and `ClipStats`) takes {format_ms(base)} ms, "
                f"**{base / med(r.ref):.2f}×** {r.ref}. Timed in the same rounds, "
                f"{r.name} takes {format_ms(extra)} ms more per step (median of the "
                "per-round differences; the difference of the two medians, "
                f"{format_ms(med(r.name) - base)} ms, also carries the spread of two "
                "separate distributions on a shared machine, so it is not the strategy's "
                "cost). "
                + (
                    f"Even a strategy costing nothing would be at {base / med(r.ref):.2f}× "
                    f"against the {r.target:g}× target: the base's per-step cost has to come "
                    "down (see the profile below)."
                    if budget <= 0
                    else f"The target leaves the strategy {format_ms(budget)} ms per step for "
                    "its own work (the percentile and the history update), "
                    + (
                        f"more than it takes: `NormClip` plus that is "
                        f"{(base + extra) / med(r.ref):.2f}× {r.ref}, within the target. The "
                        "miss comes from the spread of the timings on this shared machine "
                        "(read it as borderline), not from strategy work over budget."
                        if extra <= budget
                        else f"{format_ms(extra - budget)} ms less than it takes (see the "
                        "profile below)."
                    )
                )
            )
        elif r.name == "gradclip AGC" and "(info) clip_grad_agc_" in names:
            fn = med("(info) clip_grad_agc_")
            out.append(
                f"- {r.workload}, AGC: the stateless `clip_grad_agc_` alone takes "
                f"{format_ms(fn)} ms, **{fn / med(r.ref):.2f}×** torch's norm clipping (it reads "
                "W and G for the unit norms, then scales G per unit); the `AGC` clipper adds "
                f"{format_ms(med(r.name) - fn)} ms: the per-tensor statistics of `ClipStats` "
                "(pre- and post-clip norms and bounds, derived from the unit norms without "
                "another read of G) and the clipper's bookkeeping."
            )
        elif r.name.startswith("gradclip chain"):
            members = {
                "gradclip chain (ZClip, NormClip)": ("gradclip ZClip", "gradclip NormClip"),
                "gradclip chain (AGC, NormClip)": ("gradclip AGC", "gradclip NormClip"),
                "gradclip chain (AGC body, NormClip head)": ("gradclip AGC",),
                "gradclip chain (NormClip body, NormClip head)": ("gradclip NormClip",),
            }.get(r.name, ())
            if members and all(m in names for m in members):
                total = sum(med(m) for m in members)
                scope = "on all tensors" if len(members) == 1 else "each on all tensors"
                out.append(
                    f"- {r.workload}, {r.name}: its members alone ({', '.join(members)}, "
                    f"{scope}) "
                    f"take {format_ms(total)} ms, **{total / med(r.ref):.2f}×** torch; the chain "
                    f"takes {format_ms(med(r.name))} ms. A chain runs each member's full "
                    "`clip_()` (norm pass, bookkeeping, stats) in turn, so it costs the sum."
                )
    return out


def render(
    command: str,
    machine: dict[str, str],
    tables: dict[str, tuple[Sequence[Impl], Phased]],
    ratios: Sequence[Ratio],
    profiles: dict[str, list[tuple[str, float, float]]],
    rounds: dict[str, int],
) -> str:
    """The markdown section."""
    machine_lines = "\n".join(f"- {k}: {v}" for k, v in machine.items())
    per_workload = "\n\n".join(
        f"### {title}\n\n{times_table(impls, phased)}" for title, (impls, phased) in tables.items()
    )
    missed = [r for r in ratios if r.passed is False]
    notes = [
        f"- **Missed: {r.workload}, {r.what}**: {r.value:.2f}× against ≤ {r.target:g}×."
        for r in missed
    ] or ["- Every target was met in this run."]
    for r in ratios:
        if r.target is None:
            continue
        q1, q3 = r.phased.step.paired_quartiles(r.name, r.ref)
        if abs(r.value - r.target) <= 0.05 or (q1 <= r.target <= q3 and q3 - q1 > 0.1):
            notes.append(
                f"- **Borderline**: {r.workload}, {r.what}: {r.value:.2f}× against "
                f"≤ {r.target:g}×, per-round IQR {q1:.2f}–{q3:.2f}. On this shared machine "
                "repeated runs move such a ratio across the target; read it as at the target."
            )
    floors = floor_notes(ratios)
    if floors:
        notes.append("- How close the missed targets can get, from this run's medians:")
        notes += ["  " + line for line in floors]
    if profiles:
        notes.append(
            "- Where the gradclip side's time goes (missed targets on the small tensors; "
            "cProfile inflates Python-level costs, so read the split, not the sum):"
        )
        notes.append(profile_notes(profiles))
    notes.append(
        "- This is a shared 2-core machine. With other jobs running, a call can be "
        "descheduled mid-way, and memory bandwidth is shared: in runs at a load average of "
        "4-6 the medians of the longer calls (AGC and the chains on the small tensors, the "
        "GPT-2 spike steps) rose 2-5×, and AutoClip's full history past 32,768 entries "
        "(where torch runs its elementwise ops on both threads) grew 10-20× from step "
        f"{GROWTH_EARLY:,} to {GROWTH_LATE:,}, against the ~1.1× of a quiet run. The load "
        "averages under Machine say how busy this run was."
    )
    notes_text = "\n".join(notes)
    return f"""{BEGIN}
# Strategies vs peers

Generated by `benchmarks/strategies.py`. Command (from the repository root):

    {command}

## Machine

{machine_lines}

## Method

Peer packages: zclip 1.0.0, autoclip 0.2.1, smartclip 0.1.1. Every implementation
is timed in the same process, interleaved (the order rotates every other round),
with the gradients restored from a saved copy before **every** call, outside the
timed region (see `benchmarks/common.py`). Rounds alternate two gradient sets: the
**calm** set (the saved gradients, norm *c*: below every adaptive threshold) and
the **spike** set (the same gradients × {SPIKE:g}). A **step** is the mean of one calm
and one spike call from the same pair of rounds; the result is
**median(gradclip step) / median(reference step)**, and the calm and spike ratios
are shown next to it. Timed rounds: {rounds["gpt2"]} on GPT-2 small,
{rounds["small"]} on 500 × 32×32, {rounds["growth"]} for the step-{GROWTH_LATE:,} check
(half calm, half spikes).

State: a stateful clipper's step depends on its state, so before timing each is
driven through {WARM_STEPS} steps of realistic norms (*c* · exp(N(0, {JITTER}²)), every
{DRIVE_SPIKE_EVERY}th × {SPIKE:g}). ZClip, AutoClip, EMARatio and the peers keep state that
depends only on the global norm; they are driven with all gradients set to None but
the smallest one, which is given each step's norm (every implementation skips
parameters without a gradient), so the state moves exactly as in full steps at a
fraction of the cost. AdaGC and the per-tensor EMARatio keep one value per tensor;
they take {REAL_WARM_STEPS} full calm steps (AdaGC's warm-up is 100). During timing, after
every pair of rounds (one calm, one spike step) each driven clipper takes {FILL} more calm
steps (untimed), so spikes stay 1 in {FILL + 2} of what it sees, as in training: otherwise
percentile and raw-norm EMA clippers would soon stop flagging them. "calls
clipped" shows, per implementation, the fraction of timed calm and spike calls
that changed the gradients; "check" compares, for peers configured to compute the
same thing, the scale applied on every timed step with gradclip's. gradclip's
adaptive strategies take their norms with the blocked kernel (`norm_kernel="blocked"`,
their default: rows of 4096 elements, squares summed in float64); the peers use
torch's CPU kernel, whose float32 sums lose up to a few 1e-3 of a 38.6M-element
norm (GPT-2's embedding), so on GPT-2 their scales differ by about that much.

Configurations: AutoClip uses the {PERCENTILE:g}th percentile (autoclip's default
quantile 0.9; the paper's 10th would clip most calm steps, and the cost does not
depend on the percentile) over a window of {WINDOW} and, like `QuantileClip`, takes it
over the earlier norms (`include_current=False`); ZClip uses the paper's defaults and
zclip `max_grad_norm=None` (its default 1.0 adds fixed clipping). zclip calls
`.item()` every step and scales with a Python loop; autoclip's `QuantileClip` calls
`torch.quantile` and `torch.nn.utils.clip_grad_norm_` (which always multiplies);
smartclip's `apply` reads each gradient's norm with `.item()` and scales per
parameter. smartclip's classes hold no parameters: `apply` takes a module, here a
`torch.nn.ParameterList` of the same parameters. The peers compared with ZClip are
`zclip.ZClip` and `smartclip.ZScoreClip` (its defaults: threshold mean + 3·std of
EMAs of the raw norms); with
AutoClip, `autoclip.QuantileClip`, `autoclip.StandardClip` (threshold 2·std of the
history: it clips calm steps too) and `smartclip.AutoClip` in both of its modes; the
target is against the fastest of them. The step-{GROWTH_LATE:,} check drives
AutoClip clippers bound to the 500 small tensors to step {GROWTH_EARLY:,} and to step
{GROWTH_LATE:,} (one small gradient, as above, on one thread) and then times `clip_()`
of both on the same gradients, for each history mode (`--quick`: the window mode
only). `(info) clip_grad_agc_` is the stateless function, for the AGC floor. A chain
of two strategies on the same parameters does two strategies' work: it has no target
against torch, and its own cost is checked against `(info) AGC, then NormClip, by
hand`, the same two `clip_()` calls made one after the other.

## Results

{ratio_table(ratios)}

## Per-implementation times

{per_workload}

## Notes

{notes_text}
{END}
"""


# ---------------------------------------------------------------------------
# Main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write its section of the report."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.strategies", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed rounds on GPT-2 small (default 80, 6 with --quick); the small "
        "tensors get 4x as many, the step-50,000 check 2x (at most 160)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="few rounds, and the step-50,000 check for the window mode only: about a minute",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads while timing (default: torch's choice); 1 is steadier on a busy "
        "machine",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/RESULTS.md"), help="markdown report path"
    )
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (6 if args.quick else 80)
    if rounds < 2:
        parser.error("--rounds must be >= 2")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    counts = {"gpt2": rounds, "small": 4 * rounds, "growth": min(2 * rounds, 160)}
    counts = {k: v + v % 2 for k, v in counts.items()}

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    machine = machine_info()
    command = shlex.join(["python", "-m", "benchmarks.strategies", *sys.argv[1:]])
    begin = time.perf_counter()
    gen = torch.Generator().manual_seed(1)
    ratios: list[Ratio] = []
    tables: dict[str, tuple[Sequence[Impl], Phased]] = {}
    profiles: dict[str, list[tuple[str, float, float]]] = {}

    def lap(label: str, start: float) -> None:
        log(f"  {label}: {time.perf_counter() - start:.1f}s")

    # 500 small tensors: peers, every strategy vs torch, and the step-50,000 check.
    name = "500 × 32×32"
    log(f"{name}: building gradients")
    work = make_workload(name, small_shapes(), counts["small"])
    spiked = spiked_copy(work)
    impls = peer_impls(work) + strategy_impls(work)
    start = time.perf_counter()
    prepare(impls, work, gen)
    lap("warm-up", start)
    start = time.perf_counter()
    phased = measure_phased(
        impls,
        work,
        spiked,
        rounds=counts["small"],
        warmup_rounds=4,
        fill=make_fill(impls, work, gen),
    )
    lap("timing", start)
    small_ratios = peer_ratios(name, "small", impls, phased) + torch_ratios(name, impls, phased)
    ratios += small_ratios
    tables[f"{name}: peers and strategies"] = (impls, phased)
    for r in small_ratios:
        if r.passed is False and r.name not in profiles:
            impl = next(i for i in impls if i.name == r.name)
            profiles[r.name] = profile_step(impl, work, 200)

    start = time.perf_counter()
    grow, steps = growth_impls(work, args.quick)
    prepare(grow, work, gen, steps)
    lap(f"driving AutoClip to step {GROWTH_LATE:,}", start)
    start = time.perf_counter()
    grown = measure_phased(grow, work, spiked, rounds=counts["growth"], warmup_rounds=2, fill=None)
    lap("timing", start)
    ratios += growth_ratios(name, grow, grown)
    tables[f"{name}: AutoClip at step {GROWTH_EARLY:,} and {GROWTH_LATE:,}"] = (grow, grown)
    del work, spiked, impls, grow

    # GPT-2 small: peers.
    name = "GPT-2 small (124M, 148 tensors)"
    log(f"{name}: building gradients")
    work = make_workload(name, gpt2_small_shapes(), counts["gpt2"])
    spiked = spiked_copy(work)
    impls = peer_impls(work) + norm_pass_impls(work)
    start = time.perf_counter()
    prepare(impls, work, gen)
    lap("warm-up", start)
    start = time.perf_counter()
    phased = measure_phased(
        impls,
        work,
        spiked,
        rounds=counts["gpt2"],
        warmup_rounds=2,
        fill=make_fill(impls, work, gen),
    )
    lap("timing", start)
    ratios = peer_ratios(name, "gpt2", impls, phased) + ratios
    tables = {f"{name}: peers": (impls, phased), **tables}
    del work, spiked

    if hasattr(os, "getloadavg"):
        machine["load average at end (1, 5, 15 min)"] = ", ".join(
            f"{x:.2f}" for x in os.getloadavg()
        )
    section = render(command, machine, tables, ratios, profiles, counts)
    write_section(args.out, "strategies", section)
    log(f"done in {time.perf_counter() - begin:.0f}s; wrote {args.out}")
    for r in ratios:
        target = "" if r.target is None else f" (target ≤ {r.target:g}: {_status(r)})"
        print(f"{r.workload:32s} {r.what[:72]:72s} {r.value:6.2f}×{target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
