"""Train with DistributedDataParallel and clip with gradclip, on CPU with the gloo backend.

Run it with two processes on one machine::

    torchrun --nproc-per-node 2 examples/ddp_train.py
    torchrun --nproc-per-node 2 examples/ddp_train.py --clip autoclip:p=10 --fused

Under DDP the gradients are plain tensors, all-reduced (averaged) during
``backward()``, so every rank holds the same gradients and gradclip needs no
communication at all: each rank computes the same norm, the same threshold and the
same scale. A NaN produced on one rank (here: in one rank's input) reaches every
rank through that all-reduce, so every rank skips the step.

``--fused`` uses ``torch.optim.AdamW(fused=True)``: the clip is folded into the fused
update (``grad_scale``) and a non-finite step is skipped inside the kernel
(``found_inf``), without a host sync.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch._dynamo  # before init_process_group: see the end of main()
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gradclip


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", default="norm:1.0", help="a gradclip strategy spec")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch", type=int, default=32, help="the global batch size")
    parser.add_argument("--fused", action="store_true", help="a fused AdamW")
    parser.add_argument("--nan-step", type=int, default=15, help="poison one rank's input")
    return parser.parse_args()


def batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: a noisy nonlinear regression, heavy-tailed now and then."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(size, 16, generator=gen)
    y = torch.sin(x[:, :1] * 3) + x[:, 1:2] * x[:, 2:3]
    if step % 10 == 7:  # an outlier batch: a gradient spike for the clipper to catch
        y = y * 50
    return x, y


def main() -> None:
    """Train, clip, log from rank 0, and show that every rank saw the same norm."""
    args = parse_args()
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)
    )
    model = DistributedDataParallel(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, fused=args.fused or None)
    # Bind the clipper to the wrapped module's parameters (DDP shares them).
    clipper = gradclip.from_spec(args.clip, net.named_parameters())
    handle = gradclip.attach(optimizer, clipper)  # nonfinite="skip"

    per_rank = args.batch // world
    for step in range(args.steps):
        x, y = batch(step, args.batch)
        x, y = (
            x[rank * per_rank : (rank + 1) * per_rank],
            y[rank * per_rank : (rank + 1) * per_rank],
        )
        if step == args.nan_step and rank == world - 1:
            x = x.clone()
            x[0, 0] = float("nan")  # the all-reduce in backward() spreads it to every rank
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()  # the attached clipper clips first
        optimizer.zero_grad()
        if rank == 0 and (step % 10 == 0 or step == args.nan_step):
            stats = handle.last_stats
            assert stats is not None
            s = stats.as_dict()  # one host sync, at the logging interval only
            print(
                f"step {step:3d}  rank-0 loss {loss.item():9.4f}  norm {s['total_norm']:9.4f}  "
                f"threshold {s['threshold']:8.4f}  clipped {bool(s['clipped'])}  "
                f"finite {bool(s['finite'])}  folded {handle.folded}"
            )

    stats = handle.last_stats
    assert stats is not None
    norms = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(norms, stats.total_norm.float())
    skipped = int(handle.skipped_steps)
    if rank == 0:
        same = all(torch.equal(n, norms[0]) for n in norms)
        print(f"last total norm on every rank: {[f'{float(n):.6f}' for n in norms]} same={same}")
        print(f"skipped steps (non-finite): {skipped}")
    # Close the group so that it is really released here, not at interpreter exit,
    # where a gloo worker still releasing a tensor aborts the process ("terminate called
    # without an active exception", pytorch/pytorch#179291). Three things make that so:
    # torch._dynamo is imported before init_process_group (top of this file; imported
    # later, by the first optimizer.step(), it keeps references to the group); the DDP
    # module, whose C++ reducer holds the group, goes first (freed last with the GIL
    # held, the group would wait for its workers, which need the GIL: a hang); and a
    # barrier, so no rank leaves while a peer still uses the group.
    del model
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
