"""
Data-parallel training under torchrun: each process trains one replica on its own batches and
DistributedDataParallel averages the gradients (NCCL between GPUs, gloo between CPU processes).
Run alone, every function here is a no-op, so train.py reads the same either way.
"""
import gc
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def init(device):
    """(rank, world size, device): under torchrun, join the process group and take this process's
    GPU; alone, (0, 1, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device == "cuda":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
        # Naming the GPU binds NCCL's communicator to it now; otherwise NCCL guesses it from the
        # rank and warns that a guess can hang when ranks and GPUs do not line up one to one.
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def wrap(model, device):
    """The model the training forward goes through: DDP syncs gradients during backward."""
    if not dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)


@contextmanager
def master_first(master):
    """Process 0 runs the block first (it may download the data); the others wait, then run it."""
    if dist.is_initialized() and not master:
        dist.barrier()
    yield
    if dist.is_initialized() and master:
        dist.barrier()


def agreed(flag, device):
    """True on every process if it is true on any. All must stop at the same step, or the ones
    still training would wait for the others' gradients forever."""
    flag = torch.tensor([float(flag)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def finish(leave_together):
    """Leave the process group; after a run that ended normally, wait for the others first, since a
    process that quits while another still talks to it aborts that one."""
    if dist.is_initialized():
        if leave_together:
            dist.barrier()
        # DistributedDataParallel sits in reference cycles, so without a collection its reducer and
        # its hold on the process group would be freed only while the interpreter shuts down, when
        # gloo's worker threads can no longer take the GIL: the process then aborts ("terminate
        # called without an active exception", SIGABRT) after a run that went well.
        gc.collect()
        dist.destroy_process_group()
