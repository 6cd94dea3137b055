"""What the ranks run, and the single-process references they are compared with.

Each public function here runs on every rank of a :class:`harness.Pool` (the process
group is already initialised) and returns plain data: lists, dicts and CPU tensors.
The model, data, strategies and training loop are shared with the single-process
reference (``mode="single"``), which the test process runs itself on the full batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradclip.clippers.adagc import AdaGC
from gradclip.clippers.agc import AGC
from gradclip.clippers.autoclip import AutoClip
from gradclip.clippers.compose import chain
from gradclip.clippers.emaratio import EMARatio
from gradclip.clippers.fixed import NoClip, NormClip
from gradclip.clippers.schedule import LinearWarmup, RelaxOnCalm
from gradclip.clippers.value import ValueClip
from gradclip.clippers.zclip import ZClip

BATCH = 12
"""The full batch: divisible by 2 and 3, so every rank gets the same number of rows."""

STAT_FIELDS = ("total_norm", "threshold", "scale", "clipped_norm", "clipped", "finite", "step")


# -- the model and the data ------------------------------------------------------------------


class Net(nn.Module):
    """A small MLP whose rows shard unevenly: on 3 ranks the heads leave rank 2 empty.

    Rows per layer: 7, 7 (LayerNorm), 5, 2, 2. Two heads of the same shape make AGC
    stack two empty shards on a rank that holds no row of either.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 7)
        self.norm = nn.LayerNorm(7)
        self.hidden = nn.Linear(7, 5)
        self.head_a = nn.Linear(5, 2)
        self.head_b = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.norm(self.inp(x)))
        h = torch.tanh(self.hidden(h))
        out: Tensor = self.head_a(h) + 0.5 * self.head_b(h)
        return out


def batch(step: int, *, nan: bool = False) -> tuple[Tensor, Tensor]:
    """The full batch of ``step`` (the same on every rank and in the reference)."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, 6, generator=gen)
    y = 3.0 * torch.randn(BATCH, 2, generator=gen)
    if step % 3 == 2:  # a spike now and then, so the adaptive strategies clip
        y = 8.0 * y
    return x, y


def rows(tensor: Tensor, rank: int, world: int) -> Tensor:
    """This rank's rows of a full batch."""
    per = tensor.shape[0] // world
    return tensor[rank * per : (rank + 1) * per]


def build(mode: str) -> tuple[nn.Module, nn.Module]:
    """``(model to call, module whose named_parameters() the clipper and optimizer use)``.

    ``mode``: ``"single"`` (no process group), ``"ddp"`` or ``"fsdp"`` (FSDP2's
    ``fully_shard`` on the two inner Linear layers and the root, Shard(0) everywhere).
    """
    torch.manual_seed(0)
    net = Net()
    if mode == "single":
        return net, net
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(net), net
    if mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world_size(),))
        fully_shard(net.inp, mesh=mesh)
        fully_shard(net.hidden, mesh=mesh)
        fully_shard(net, mesh=mesh)
        return net, net
    raise ValueError(f"unknown mode {mode!r}")


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def full(tensor: Tensor) -> Tensor:
    """The whole tensor of a DTensor (a collective), else a copy."""
    from gradclip.norms import is_dtensor

    if is_dtensor(tensor):
        whole: Tensor = tensor.full_tensor()  # type: ignore[attr-defined]
        return whole.detach().clone()
    return tensor.detach().clone()


# -- the strategies ---------------------------------------------------------------------------

Factory = Callable[[list[tuple[str, Tensor]]], Any]

STRATEGIES: dict[str, Factory] = {
    "none": lambda named: NoClip(named),
    "norm": lambda named: NormClip(named, max_norm=2.0),
    "norm-inf": lambda named: NormClip(named, max_norm=0.5, norm_type=math.inf),
    "norm-l1": lambda named: NormClip(named, max_norm=4.0, norm_type=1.0),
    "norm-warmup": lambda named: NormClip(named, max_norm=3.0, schedule=LinearWarmup(3, 0.2)),
    "norm-relax": lambda named: NormClip(
        named, max_norm=2.0, schedule=RelaxOnCalm(window=2, max_cv=10.0, growth=1.5)
    ),
    "value": lambda named: ValueClip(named, clip_value=0.3),
    "agc": lambda named: AGC(named, clip_factor=0.05, exclude="head_b.*"),
    "autoclip": lambda named: AutoClip(named, percentile=30, history="window", window=3),
    "autoclip-full": lambda named: AutoClip(named, percentile=50, history="full"),
    "autoclip-stream": lambda named: AutoClip(named, percentile=50, history="stream"),
    "zclip": lambda named: ZClip(named, z_thresh=0.5, warmup_steps=2),
    "adagc": lambda named: AdaGC(named, lambda_abs=2.0, lambda_rel=1.05, warmup_steps=2),
    "emaratio": lambda named: EMARatio(named, ratio=1.1, beta=0.5, warmup_steps=1),
    "emaratio-per-tensor": lambda named: EMARatio(
        named, ratio=1.1, beta=0.5, per_tensor=True, warmup_steps=1
    ),
    "groups": lambda named: AdaGC(
        [
            {"params": [(n, p) for n, p in named if not n.startswith("head")]},
            {"params": [(n, p) for n, p in named if n.startswith("head")], "lambda_abs": 0.5},
        ],
        warmup_steps=1,
    ),
    "chain": lambda named: chain(
        AGC([(n, p) for n, p in named if not n.startswith("head")], clip_factor=0.05),
        NormClip(named, max_norm=2.0),
    ),
}
"""Every registered strategy, with options under which it clips on this model."""


def make_clipper(strategy: str, module: nn.Module) -> Any:
    return STRATEGIES[strategy](list(module.named_parameters()))


# -- training ---------------------------------------------------------------------------------


def stats_record(stats: Any) -> dict[str, Tensor]:
    record = {name: getattr(stats, name).detach().clone() for name in STAT_FIELDS}
    record["norms"] = stats.norms.detach().clone()
    return record


def train(
    mode: str,
    strategy: str,
    steps: int,
    *,
    nan_step: int | None = None,
    nan_rank: int = 0,
) -> list[dict[str, Any]]:
    """Train ``steps`` steps, clipping with ``clipper.clip_()``; one record per step.

    A record holds the step's :class:`ClipStats` fields and the full parameters after
    the optimizer step.
    """
    model, module = build(mode)
    clipper = make_clipper(strategy, module)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.5)
    return _loop(mode, model, module, clipper, optimizer, range(steps))


def _loop(
    mode: str,
    model: nn.Module,
    module: nn.Module,
    clipper: Any,
    optimizer: torch.optim.Optimizer,
    steps: range,
) -> list[dict[str, Any]]:
    records = []
    r, w = rank(), world_size()
    for step in steps:
        x, y = batch(step)
        if mode != "single":
            x, y = rows(x, r, w), rows(y, r, w)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        stats = clipper.clip_()
        optimizer.step()
        optimizer.zero_grad()
        record: dict[str, Any] = stats_record(stats)
        record["params"] = {n: full(p) for n, p in module.named_parameters()}
        records.append(record)
    return records


def reference(strategy: str, steps: int) -> list[dict[str, Any]]:
    """The single-process, full-batch run of :func:`train`."""
    return train("single", strategy, steps)


# -- resume -----------------------------------------------------------------------------------


def resume(
    mode: str, strategy: str, steps: int, split: int, directory: str, clipper_io: str = "per-rank"
) -> dict[str, Any]:
    """Train ``split`` steps, save, rebuild everything from the files, train the rest.

    The model and optimizer go through ``torch.distributed.checkpoint`` (sharded). The
    clipper's state (``clipper_io``): ``"per-rank"``, each rank saves its own with
    ``torch.save`` and loads it with ``weights_only=True``; ``"rank0"``, rank 0 saves and every
    rank loads that one file; ``"dcp"``, inside the DCP checkpoint; ``"none"``, not
    restored (a control: the resumed run must then differ). Returns the records of
    this run after the split and of an uninterrupted one, and the saved clipper state.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(directory)
    r = rank()

    def fresh() -> tuple[nn.Module, nn.Module, Any, torch.optim.Optimizer]:
        model, module = build(mode)
        clipper = make_clipper(strategy, module)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.5)
        return model, module, clipper, optimizer

    model, module, clipper, optimizer = fresh()
    straight = _loop(mode, model, module, clipper, optimizer, range(steps))

    model, module, clipper, optimizer = fresh()
    _loop(mode, model, module, clipper, optimizer, range(split))
    model_state, optim_state = get_state_dict(module, optimizer)
    checkpoint: dict[str, Any] = {"model": model_state, "optim": optim_state}
    saved_state = clipper.state_dict()
    if clipper_io == "dcp":
        checkpoint["clipper"] = saved_state
    dcp.save(checkpoint, checkpoint_id=str(folder / "dcp"))
    if clipper_io == "per-rank" or (clipper_io == "rank0" and r == 0):
        torch.save(saved_state, folder / f"clipper-rank{r}.pt")
    dist.barrier()
    del model, module, clipper, optimizer

    model, module, clipper, optimizer = fresh()
    model_state, optim_state = get_state_dict(module, optimizer)
    loaded: dict[str, Any] = {"model": model_state, "optim": optim_state}
    if clipper_io == "dcp":
        loaded["clipper"] = clipper.state_dict()
    dcp.load(loaded, checkpoint_id=str(folder / "dcp"))
    set_state_dict(
        module, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"]
    )
    if clipper_io == "dcp":
        clipper.load_state_dict(loaded["clipper"])
    elif clipper_io != "none":
        source = r if clipper_io == "per-rank" else 0
        clipper.load_state_dict(torch.load(folder / f"clipper-rank{source}.pt", weights_only=True))
    resumed = _loop(mode, model, module, clipper, optimizer, range(split, steps))
    return {"straight": straight[split:], "resumed": resumed, "state": saved_state}


# -- mixed DTensor / plain gradients on several meshes -------------------------------------------

MIXED: list[tuple[str, tuple[int, ...], str | None, str, str]] = [
    # name, shape, mesh (None: a plain tensor), weight placements, gradient placements
    ("rows", (9, 4), "flat", "S0", "S0"),  # uneven: 5/4 rows on 2 ranks
    ("few_rows", (2, 3), "flat", "S0", "S0"),  # an empty shard on 3 ranks
    ("vector", (5,), "flat", "S0", "S0"),  # AGC's one unit, split across ranks
    ("one", (1,), "flat", "S0", "S0"),  # empty on every rank but the first
    ("cols", (4, 6), "reversed", "S1", "S1"),  # a second mesh, column-sharded
    ("replicated", (3, 3), "reversed", "R", "R"),
    ("plain", (6,), None, "", ""),
    ("scalar", (), None, "", ""),
    ("grid_rows", (5, 4), "grid", "S0,R", "S0,R"),  # a 2-D mesh (world x 1)
    ("grid_both", (4, 5), "grid", "S1,S0", "S1,S0"),  # sharded on both mesh dims
    ("pending", (7, 2), "flat", "R", "P"),  # a Partial (pending sum) gradient
]
"""The tensors of the mixed scenario; AGC leaves out the column-sharded ones."""

AGC_UNSUPPORTED = {"cols", "grid_both"}


def _placements(spec: str) -> list[Any]:
    from torch.distributed.tensor import Partial, Replicate, Shard

    table = {"S0": Shard(0), "S1": Shard(1), "R": Replicate(), "P": Partial()}
    return [table[part] for part in spec.split(",")]


_MESHES: tuple[Any, dict[str, Any]] | None = None
"""``(the default group, its meshes)``: the meshes of MIXED, built once per process group."""


def _meshes() -> dict[str, Any]:
    """The MIXED meshes, built on first use and kept for this rank's process group.

    Building a mesh creates process groups (each gloo group has its own threads and
    sockets) that live as long as the rank: built per call, ``mixed()`` alone would add
    dozens of groups each time it runs.
    """
    global _MESHES
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    group = dist.group.WORLD
    if _MESHES is None or _MESHES[0] is not group:
        w = world_size()
        _MESHES = (
            group,
            {
                "flat": init_device_mesh("cpu", (w,)),
                "reversed": DeviceMesh("cpu", list(reversed(range(w)))),
                "grid": init_device_mesh("cpu", (w, 1), mesh_dim_names=("dp", "tp")),
            },
        )
    return _MESHES[1]


def mixed_params(
    seed: int, *, distributed: bool, scale: float = 1.0, agc: bool = False
) -> list[tuple[str, nn.Parameter]]:
    """The MIXED tensors with random weights and gradients, the same values everywhere.

    ``distributed=False`` gives plain tensors holding the whole values (the reference).
    """
    gen = torch.Generator().manual_seed(seed)
    meshes = _meshes() if distributed else {}
    out = []
    for name, shape, mesh_name, w_spec, g_spec in MIXED:
        if agc and name in AGC_UNSUPPORTED:
            continue
        weight = torch.randn(shape, generator=gen)
        grad = scale * torch.randn(shape, generator=gen)
        if not distributed or mesh_name is None:
            p = nn.Parameter(weight)
            p.grad = grad
        else:
            from torch.distributed.tensor import DTensor, distribute_tensor

            mesh = meshes[mesh_name]
            p = nn.Parameter(distribute_tensor(weight, mesh, _placements(w_spec)))
            if g_spec == "P":  # the sum over ranks is the gradient: rank 0 holds it all
                local = grad if rank() == 0 else torch.zeros_like(grad)
                p.grad = DTensor.from_local(local, mesh, _placements(g_spec))
            else:
                p.grad = distribute_tensor(grad, mesh, _placements(g_spec))
        out.append((name, p))
    return out


MIXED_STRATEGIES: dict[str, Factory] = {
    "norm": lambda named: NormClip(named, max_norm=3.0),
    "norm-inf": lambda named: NormClip(named, max_norm=1.0, norm_type=math.inf),
    "value": lambda named: ValueClip(named, clip_value=0.5),
    "agc": lambda named: AGC(named, clip_factor=0.1),
    "autoclip": lambda named: AutoClip(named, percentile=50, history="full"),
    "zclip": lambda named: ZClip(named, warmup_steps=1),
    "adagc": lambda named: AdaGC(named, lambda_abs=3.0, warmup_steps=1),
    "emaratio": lambda named: EMARatio(named, ratio=1.1, warmup_steps=1),
    "emaratio-per-tensor": lambda named: EMARatio(
        named, ratio=1.1, per_tensor=True, warmup_steps=1
    ),
}


def mixed(seed: int = 0, distributed: bool = True) -> dict[str, Any]:
    """Every functional op and the strategies on the MIXED tensors: norms, clipped grads, stats.

    With ``distributed=False`` the same on plain tensors in one process (the reference).
    """
    import gradclip
    from helpers import NORM_TYPES

    def fresh(**kwargs: Any) -> list[tuple[str, nn.Parameter]]:
        return mixed_params(seed, distributed=distributed, **kwargs)

    def grads(named: list[tuple[str, nn.Parameter]]) -> dict[str, Tensor]:
        return {n: full(p.grad) for n, p in named}  # type: ignore[arg-type]

    out: dict[str, Any] = {}
    for p in NORM_TYPES:
        named = fresh()
        gs = [q.grad for _, q in named]
        out[f"tensor_norms/{p}"] = gradclip.tensor_norms(gs, p)  # type: ignore[arg-type]
        out[f"get_total_norm/{p}"] = gradclip.get_total_norm(gs, p)  # type: ignore[arg-type]
        out[f"clip_grad_norm_/{p}"] = gradclip.clip_grad_norm_(named, 0.5, p)
        out[f"clip_grad_norm_/{p}/grads"] = grads(named)
    named = fresh()
    out["grad_norm"] = gradclip.grad_norm([q for _, q in named])
    named = fresh()
    gradclip.clip_grads_with_norm_(named, 1.0, torch.tensor(4.0))
    out["clip_grads_with_norm_/grads"] = grads(named)
    named = fresh()
    gradclip.clip_grad_value_(named, 0.5)
    out["clip_grad_value_/grads"] = grads(named)
    named = fresh(agc=True, scale=0.5)
    out["clip_grad_agc_"] = gradclip.clip_grad_agc_(named, clip_factor=0.1)
    out["clip_grad_agc_/grads"] = grads(named)
    for strategy, factory in MIXED_STRATEGIES.items():
        named = fresh(agc=strategy == "agc")
        clipper = factory(named)
        for step in range(3):
            if step:  # new gradients, larger each step so the adaptive ones clip
                again = mixed_params(
                    seed + step, distributed=distributed, scale=3.0**step, agc=strategy == "agc"
                )
                for (_, q), (_, r) in zip(named, again):
                    q.grad = r.grad
            stats = clipper.clip_()
            out[f"{strategy}/{step}/stats"] = stats_record(stats)
            out[f"{strategy}/{step}/grads"] = grads(named)
    return out


# -- non-finite gradients -------------------------------------------------------------------------


def nonfinite(
    mode: str,
    policy: str,
    norm_type: float = 2.0,
    *,
    nan_rank: int = 0,
    nan_step: int = 1,
    steps: int = 3,
    fused: bool = False,
) -> list[dict[str, Any]]:
    """Train under ``attach(..., nonfinite=policy)`` with a NaN on one rank at ``nan_step``.

    Under DDP the NaN goes into that rank's input (the gradient all-reduce spreads it,
    as a real overflow would); under FSDP2 (and in the single-process reference) into
    one element of that rank's shard of a gradient, after the backward pass. Each
    record holds the error raised by ``optimizer.step()`` (the parameter it names), the
    handle's counters and the full parameters after the step.
    """
    from gradclip.integrations.optim import attach
    from gradclip.nonfinite import NonFiniteGradientError

    model, module = build(mode)
    clipper = NormClip(list(module.named_parameters()), max_norm=2.0, norm_type=norm_type)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.5, fused=fused or None)
    handle = attach(optimizer, clipper, nonfinite=policy)  # type: ignore[arg-type]
    r, w = rank(), world_size()
    records = []
    for step in range(steps):
        x, y = batch(step)
        if mode != "single":
            x, y = rows(x, r, w), rows(y, r, w)
        poisoned = step == nan_step and r == nan_rank
        if poisoned and mode == "ddp":
            x = x.clone()
            x[0, 0] = math.nan
        nn.functional.mse_loss(model(x), y).backward()
        if poisoned and mode != "ddp":
            grad = module.inp.weight.grad
            assert grad is not None
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            local[0, 1] = math.nan
        error = None
        try:
            optimizer.step()
        except NonFiniteGradientError as exc:
            error = exc.name
        optimizer.zero_grad()
        stats = handle.last_stats
        assert stats is not None
        records.append(
            {
                "error": error,
                "finite": bool(stats.finite),
                "total_norm": stats.total_norm.clone(),
                "skipped": int(handle.skipped_steps),
                "clipper_step": clipper.step,
                "params": {n: full(p) for n, p in module.named_parameters()},
            }
        )
    handle.remove()
    return records


def inf_norm_with_nan(nan_rank: int) -> dict[str, Tensor]:
    """Inf-norms of two Shard(0) tensors, the first with a NaN in ``nan_rank``'s shard.

    Also returns what a bare gloo MAX all-reduce makes of a NaN held by that rank
    alone (the pitfall the norms must not fall into).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import gradclip

    mesh = init_device_mesh("cpu", (world_size(),))
    first = distribute_tensor(torch.arange(1.0, 7.0), mesh, [Shard(0)])
    second = distribute_tensor(torch.tensor([1.0, -4.0, 2.0, 0.5]), mesh, [Shard(0)])
    if rank() == nan_rank:
        first.to_local()[0] = math.nan
    raw = torch.tensor([math.nan if rank() == nan_rank else 1.0])
    dist.all_reduce(raw, dist.ReduceOp.MAX)
    return {"gradclip": gradclip.tensor_norms([first, second], math.inf), "gloo_max": raw}


# -- the harness itself -----------------------------------------------------------------------


def wait_alone() -> str:
    """Rank 0 waits in a barrier nobody else joins: a hang the harness must end."""
    import torch.distributed as dist

    if rank() == 0:
        dist.barrier()
    return "returned"


def fail_on(bad_rank: int) -> int:
    """Raise on one rank, return the rank elsewhere."""
    if rank() == bad_rank:
        raise ValueError(f"rank {bad_rank} fails on purpose")
    return rank()
