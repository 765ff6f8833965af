"""
The device a run computes on: which one, whether bf16 autocast pays there, and whether (and how)
the training step is compiled. train.py, evaluate.py and bench.py ask here.
"""
import os
import shutil

import torch

from common.checkpoint import RunError


def resolve_device(requested):
    """"auto" -> CUDA when there is a GPU, else the CPU; an explicit "cuda" must exist."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise RunError(f"--device cuda: {why}; use --device cpu (or auto)")
    return requested


def bf16_pays(device):
    """Whether bf16 autocast speeds up the matmuls here: on CUDA, and on CPUs with bf16 arithmetic
    (AVX512-BF16, AMX: 1.45x per training step on a 2-core Zen 4). Any other CPU would emulate it,
    slower than fp32."""
    if device.startswith("cuda"):
        return True
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # absent from older torch: fp32
    caps = get_capabilities() if get_capabilities else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def evaluates_in_bf16(trained_in_bf16, device):
    """Whether a rollout runs the policy under bf16 autocast: on a CPU with bf16 arithmetic, for a
    model that trained under it, whose weights have met bf16's rounding all along. The forward of
    an evaluation step is small (a window per episode), so it is the CPU's time that bf16 saves:
    1.4x the env steps/s of fp32 on a maze DT, same scores within their episode noise
    (docs/speed.md). On CUDA evaluation stays fp32: launches, not arithmetic, set its pace."""
    return trained_in_bf16 and device == "cpu" and bf16_pays(device)


def compiles(requested, device):
    """--compile (True/False), or by default (None): on CUDA, where the step is launch-bound; off on
    a CPU, where it measured slower for the DT (docs/speed.md). On a CPU torch.compile builds its
    kernels with a C++ compiler: without one it would fail deep inside its first step."""
    wanted = requested if requested is not None else device.startswith("cuda")
    if wanted and not device.startswith("cuda") and not shutil.which(os.environ.get("CXX", "g++")):
        raise RunError("--compile on a CPU needs a C++ compiler (g++, or the one $CXX names) to build "
                       "its kernels: install one, or leave out --compile")
    return wanted


def compile_mode(device, graphed=False):
    """On CUDA in one process, "reduce-overhead": a training step is hundreds of small kernels whose
    launches set the pace, and replaying them as CUDA graphs trained a whole 120-epoch run on an
    H200 at 243 steps/s against the default mode's 126 (docs/speed.md). Under torchrun, the default
    mode: CUDA graphs together with DDP's gradient hooks are unmeasured here and have had known
    crashes (pytorch/pytorch#128218). With --graph-steps (graphed) the default mode too: the whole
    step is recorded around it, and graphs cannot be recorded inside graphs. On a CPU there are no
    graphs to replay."""
    one_process = not torch.distributed.is_initialized()
    return "reduce-overhead" if device.startswith("cuda") and one_process and not graphed else None
