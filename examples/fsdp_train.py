"""Train with FSDP2 (``fully_shard``) and clip with gradclip, on CPU with the gloo backend.

Run it with two processes on one machine::

    torchrun --nproc-per-node 2 examples/fsdp_train.py
    torchrun --nproc-per-node 2 examples/fsdp_train.py --clip zclip:z=2.5 --steps 60
    torchrun --nproc-per-node 2 examples/fsdp_train.py --checkpoint /tmp/fsdp-ckpt  # twice

With FSDP2 every gradient is a DTensor holding this rank's rows (``Shard(0)``).
gradclip's norms are those of the whole tensors, reduced across ranks, so the
threshold, the clip and every ``ClipStats`` value are the same on every rank as in a
single process on the full batch; a NaN on one rank's shard makes every rank skip
the step. Nothing here is specific to distributed training except the setup: the
clipper and ``attach`` are used exactly as in a single process.

``--checkpoint DIR`` saves the model and optimizer with ``torch.distributed.checkpoint``
and the clipper's state with ``torch.save`` (it is identical on every rank, so rank 0
writes one file and every rank reads it); run it again to resume from there.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import gradclip


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", default="norm:1.0", help="a gradclip strategy spec")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch", type=int, default=32, help="the global batch size")
    parser.add_argument("--checkpoint", type=Path, default=None, help="save to / resume from")
    parser.add_argument("--nan-step", type=int, default=15, help="poison one rank's gradient")
    return parser.parse_args()


def make_model() -> nn.Module:
    """A small MLP, built from the same seed on every rank."""
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(
        nn.Linear(16, 64),
        nn.GELU(),
        nn.LayerNorm(64),
        nn.Linear(64, 64),
        nn.GELU(),
        nn.Linear(64, 1),
    )


def batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: a noisy nonlinear regression, heavy-tailed now and then."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(size, 16, generator=gen)
    y = torch.sin(x[:, :1] * 3) + x[:, 1:2] * x[:, 2:3]
    if step % 10 == 7:  # an outlier batch: a gradient spike for the clipper to catch
        y = y * 50
    return x, y


def shutdown() -> NoReturn:
    """Leave the process group and end this rank, skipping interpreter finalization.

    ``fully_shard`` (like ``distribute_tensor``) keeps references to the process group in
    C++, so ``destroy_process_group()`` does not release it and gloo's worker threads
    live on until the interpreter finalizes. A worker that then drops a tensor must take
    the GIL, and the process aborts: "terminate called without an active exception"
    (pytorch/pytorch#179291). So every rank waits for the others, closes the group,
    flushes its output and ends with ``os._exit(0)``, before finalization.
    """
    dist.barrier()  # no rank leaves while a peer still uses the group
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    """Train, clip, log from rank 0, checkpoint, and show that every rank saw the same norm."""
    args = parse_args()
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    model = make_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    clipper = gradclip.from_spec(args.clip, model.named_parameters())
    handle = gradclip.attach(optimizer, clipper)  # nonfinite="skip": all ranks skip together

    start = 0
    if args.checkpoint is not None and (args.checkpoint / "clipper.pt").exists():
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        saved = torch.load(args.checkpoint / "clipper.pt", weights_only=True)
        dcp.load(state, checkpoint_id=str(args.checkpoint / f"dcp-{saved['step']}"))
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        clipper.load_state_dict(saved["clipper"])
        start = saved["step"]
        if rank == 0:
            print(f"resumed at step {start} from {args.checkpoint}")

    per_rank = args.batch // world
    for step in range(start, start + args.steps):
        x, y = batch(step, args.batch)
        x, y = (
            x[rank * per_rank : (rank + 1) * per_rank],
            y[rank * per_rank : (rank + 1) * per_rank],
        )
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step == args.nan_step and rank == world - 1:
            # A NaN in the last rank's shard only: the step is skipped on every rank.
            model[0].weight.grad.to_local()[0, 0] = float("nan")
        optimizer.step()  # the attached clipper clips first
        optimizer.zero_grad()
        if rank == 0 and (step % 10 == 0 or step == args.nan_step):
            stats = handle.last_stats
            assert stats is not None
            s = stats.as_dict()  # one host sync, at the logging interval only
            print(
                f"step {step:3d}  rank-0 loss {loss.item():9.4f}  norm {s['total_norm']:9.4f}  "
                f"threshold {s['threshold']:8.4f}  clipped {bool(s['clipped'])}  "
                f"finite {bool(s['finite'])}"
            )

    # Every rank computed the same stats: gather one value from each to show it.
    stats = handle.last_stats
    assert stats is not None
    norms = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(norms, stats.total_norm.float())
    skipped = int(handle.skipped_steps)
    if rank == 0:
        same = all(torch.equal(n, norms[0]) for n in norms)
        print(f"last total norm on every rank: {[f'{float(n):.6f}' for n in norms]} same={same}")
        print(f"skipped steps (non-finite): {skipped}")

    if args.checkpoint is not None:
        end = start + args.steps
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.save(state, checkpoint_id=str(args.checkpoint / f"dcp-{end}"))
        if rank == 0:
            state = {"clipper": clipper.state_dict(), "step": end}
            torch.save(state, args.checkpoint / "clipper.pt")
            print(f"saved to {args.checkpoint}")
    shutdown()


if __name__ == "__main__":
    main()
