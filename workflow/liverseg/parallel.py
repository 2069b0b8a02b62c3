"""Data-parallel training of one model on several GPUs (or CPU processes): the plumbing train.py needs.

``train.gpus: N`` makes the workflow start ``torchrun --standalone --nproc_per_node N -m liverseg train ...``
(``launcher``); each process finds its rank in torchrun's environment (``processes``).  The run computes what a
single process computes on the same global batch:
- every process draws the same epoch (data.epoch_draws) and takes its contiguous share of each global batch
  (``share``); augmentation draws per sample from the sample's draw key, so it does not depend on the split;
- BatchNorm normalises over the global batch (torch's SyncBatchNorm on CUDA; ``GlobalBatchNorm`` on CPU, where
  torch's refuses to run);
- the loss's batch sums (soft Dice) are summed over the processes with ``all_sum``, whose backward sums the
  gradients too, so after DistributedDataParallel averages the gradients they are those of the global batch.
Only rank 0 validates and writes files; the others wait at the next collective.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from liverseg.errors import ConfigError

# Ranks > 0 wait at a collective while rank 0 validates an epoch (model B runs through the cascade on every
# validation case): the default timeout (10 min for NCCL) would kill a long validation.
WAIT = timedelta(hours=3)


def launcher(gpus: int) -> str:
    """The command that runs ``liverseg`` for a training job on ``gpus`` processes of one machine."""
    if gpus <= 1:
        return "python -m liverseg"
    return f"torchrun --standalone --nproc_per_node {int(gpus)} -m liverseg"


@dataclass(frozen=True)
class Procs:
    """Where this process stands in a data-parallel run (a single process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


@contextmanager
def processes(device: torch.device):
    """Yield (Procs, this process's device).  Under torchrun (WORLD_SIZE > 1) join the process group (NCCL with
    one GPU per process, cuda:LOCAL_RANK; gloo on CPU) and leave it on the way out, also after an error."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Procs(), device
        return
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"train.gpus asks for {world} processes but this machine shows "
                              f"{torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=WAIT)
    try:
        yield Procs(rank, world), device
    finally:
        dist.destroy_process_group()


class _AllSum(torch.autograd.Function):
    """Sum over the processes; the backward sums the incoming gradients over the processes too."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_sum(t: torch.Tensor, procs: Procs) -> torch.Tensor:
    """``t`` summed over the processes, differentiably.  Each process's loss then depends on every process's
    inputs, and the backward hands each process the sum over all losses of their gradients through its own
    inputs; DistributedDataParallel's mean over the processes turns that into the gradient of the mean loss,
    exactly as it does for the per-process terms."""
    if not procs.distributed:
        return t
    return _AllSum.apply(t)


def per_process(batch_size: int, procs: Procs) -> int:
    """Samples of each global batch one process trains on; the batch must split evenly (one-line error)."""
    if batch_size % procs.world:
        raise ConfigError(f"batch_size {batch_size} cannot be split evenly over {procs.world} training processes "
                          "(train.gpus): use a multiple of it")
    return batch_size // procs.world


def share(draws: list, batch_size: int, procs: Procs) -> list:
    """This process's draws: its contiguous 1/world of every full global batch (global batch b is the same
    samples as a single process's batch b; an incomplete last batch is dropped, as the DataLoader does)."""
    per = per_process(batch_size, procs)
    out = []
    for b in range(len(draws) // batch_size):
        start = b * batch_size + procs.rank * per
        out.extend(draws[start : start + per])
    return out


def sums(values: list[float], procs: Procs, device: torch.device) -> list[float]:
    """Plain numbers summed over the processes (epoch statistics for the log)."""
    if not procs.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def from_main(flag: bool, procs: Procs, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every process (early stopping); also where the other ranks wait for rank 0."""
    if not procs.distributed:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch on CPU (gloo), where torch's SyncBatchNorm refuses to run (and
    DistributedDataParallel refuses it).  In training mode the statistics are summed over the processes with
    ``all_sum`` (the mean first, then the squared deviations from it: as exact as a single process's two-pass
    variance); in eval mode, or alone, it is BatchNorm.  Same parameters and buffers as BatchNorm, so state dicts
    are interchangeable."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        procs = Procs(dist.get_rank(), dist.get_world_size())
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        s = all_sum(torch.cat([xf.sum(dims), xf.new_tensor([xf.numel() // c])]), procs)
        count = s[-1]
        mean = s[:c] / count
        d = xf - mean.view(shape)
        var = all_sum((d * d).sum(dims), procs) / count
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():  # as BatchNorm: the running variance is the unbiased one
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(var.detach() * count / max(float(count) - 1, 1.0), alpha=f)
        y = d * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def data_parallel(model: nn.Module, procs: Procs, device: torch.device) -> nn.Module:
    """``model`` (already on ``device``) with BatchNorm over the global batch, wrapped in DistributedDataParallel;
    the model itself when there is one process.  The wrapped model's ``.module`` holds the plain state dict."""
    if not procs.distributed:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.__class__ = GlobalBatchNorm  # same parameters and buffers: only the forward changes
    # static_graph: every step runs the same graph, and an encoder cut to encoder_depth keeps parameters no step
    # uses (their gradients stay None, as in a single process).
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               static_graph=True)


def inner(model: nn.Module) -> nn.Module:
    """The model a DistributedDataParallel wrapper holds (or ``model``)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
