"""
Where a run lives: its output files, and the checkpoint that train.py writes and evaluate.py reads.

A checkpoint is a dict of tensors and plain Python values only (model weights and config, the
data's normalization, and for resuming the optimizer, RNG states and step), so it loads with
torch.load(weights_only=True) and a file from a stranger cannot run code. It is always written to a
temporary file and renamed, so the file on disk is the last complete save, never half of one,
and a run that is asked to stop (Ctrl-C, SIGTERM) saves before it exits: StopOnSignal.
"""
import fcntl
import os
import pickle
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from common.acting import WindowPolicy
from data import Normalization
from methods.bc import BehaviourCloning
from methods.iql import IQL
from methods.plan import planning_policy
from methods.reinformer import MaxReturnPolicy, Reinformer
from methods.tt import TrajectoryTransformer, TTConfig
from model import DecisionTransformer, DTConfig

FORMAT_VERSION = 1
CHECKPOINT_KEYS = ("model", "model_config", "state_mean", "state_std", "reward_scale", "env_id")


class Kind(NamedTuple):
    config: type       # its config dataclass
    model: type        # its nn.Module
    policy: type       # how it acts in a rollout (acting.py)
    conditioned: bool  # whether it acts on a target return it is asked for (only the DT does)


# Every model a checkpoint can hold, by the `kind` its config records. BC and IQL act on the state
# alone, Reinformer on the return it predicts itself, the TT on its plans.
MODEL_KINDS = {"dt": Kind(DTConfig, DecisionTransformer, WindowPolicy, True),
               "bc": Kind(DTConfig, BehaviourCloning, WindowPolicy, False),
               "iql": Kind(DTConfig, IQL, WindowPolicy, False),
               "reinformer": Kind(DTConfig, Reinformer, MaxReturnPolicy, False),
               "tt": Kind(TTConfig, TrajectoryTransformer, planning_policy, False)}


def build_model(config):
    """A model from its config: a config dataclass, or the dict of one that a checkpoint stores."""
    if isinstance(config, dict):
        config = MODEL_KINDS[config.get("kind", "dt")].config(**config)
    return MODEL_KINDS[config.kind].model(config)


class RunError(Exception):
    """A run that cannot start or go on; the message says why and what to do."""


class CheckpointError(RunError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`, renamed over it once written: os.replace is atomic,
    so an interrupted write leaves the old file (or none), never a truncated one. The temporary
    name keeps the suffix because writers pick the file format from it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path, ckpt):
    """Write `ckpt` to `path` atomically. A full disk or a vanished folder ends the run with one
    line; the previous checkpoint, if any, is still whole."""
    try:
        with atomic_write(path) as tmp:
            torch.save(ckpt, tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        kept = (f"{path} still holds step {read_step(path)}, resume from it with --resume {path}"
                if Path(path).exists() else "nothing was saved")
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed (is the disk full?)"
        raise RunError(f"cannot write {path}: {reason}; {kept} once there is room") from None


def read_step(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["step"]
    except Exception:
        return "?"


def read_checkpoint(path, device="cpu"):
    """The dict train.py saved, checked to be one of ours in a format this code reads."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file") from None
    except pickle.UnpicklingError:  # weights_only refused an object that could run code
        raise CheckpointError(f"{path}: not a readable checkpoint: it holds objects other than tensors "
                              f"and plain values, which could run code when loaded") from None
    except Exception:
        raise CheckpointError(f"{path}: not a readable checkpoint (not written by torch.save, or "
                              f"damaged)") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint written by this code's train.py")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ckpt['format_version']!r}, but this "
                              f"code reads version {FORMAT_VERSION}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: damaged checkpoint, missing {', '.join(missing)}")
    return ckpt


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint written by train.py -> (model in eval mode, its Normalization, the dict)."""
    ckpt = read_checkpoint(path, device)
    try:
        model = build_model(ckpt["model_config"]).to(device)
        model.load_state_dict(ckpt["model"])
    except Exception:  # a config or weights that do not fit the model this code builds
        raise CheckpointError(f"{path}: damaged checkpoint, its weights do not fit its config") from None
    norm = Normalization(ckpt["state_mean"], ckpt["state_std"], ckpt["reward_scale"],
                         ckpt.get("reward_mode", "dense"), ckpt.get("bins"))
    return model.eval(), norm, ckpt


def rng_state(generator):
    """Everything random in a step: the batch sampler's generator and the global generators that
    dropout draws from. Saving them is what makes a resumed run continue the same sequence."""
    state = {"sampler": generator.get_state(), "torch": torch.get_rng_state()}
    if generator.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state, generator):
    generator.set_state(state["sampler"].cpu())
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and generator.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu())


def resume_run(path, data_path, defaults):
    """(saved checkpoint, the run's own settings as a dict) for train.py --resume, which goes on in
    the same file; `defaults` (a dict) fill in settings that older checkpoints did not record, and
    `data_path`, where given, says where the data now is."""
    saved = read_checkpoint(path)
    if not all(k in saved for k in ("optimizer", "rng", "train_args", "step", "elapsed_s")):
        raise CheckpointError(f"{path}: holds no training state to resume from (only a model)")
    settings = {**defaults, **saved["train_args"]}
    if not data_path and not Path(settings["data"]).exists():
        raise CheckpointError(f"{path}: the run's data {settings['data']} is not there (a path "
                              f"relative to where it started?); say where it is with --data PATH")
    settings.update(resume=path, out=path, data=data_path or settings["data"])
    return saved, settings


def check_same_data(saved, data, env_id, path, data_path):
    """A resumed run must go on with the data its checkpoint was trained on."""
    if env_id != saved["env_id"] or not (torch.equal(data.norm.state_mean, saved["state_mean"].cpu())
                                         and torch.equal(data.norm.state_std, saved["state_std"].cpu())):
        raise CheckpointError(f"{path} was trained on other data than {data_path} "
                              f"({saved['env_id']}, different observation statistics); cannot resume")


def restore(saved, model, optimizer, gen, path, seed, rank):
    """Put a checkpoint's training state back; returns (step, training seconds so far)."""
    try:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"], gen)
    except (KeyError, ValueError, RuntimeError):
        raise CheckpointError(f"{path}: damaged training state (its weights, optimizer or random "
                              f"state do not fit this run)") from None
    if rank > 0:  # the checkpoint holds process 0's sampler state; the others draw afresh
        gen.manual_seed(int(np.random.SeedSequence((seed, rank, saved["step"])).generate_state(1)[0]))
    return saved["step"], saved["elapsed_s"]


def claim_output(path, resuming, overwrite):
    """Make sure the run may write `path` (and its log beside it) before any work is done: its
    folder exists and is writable, no other run is writing it, and an existing checkpoint is
    replaced only when asked. Returns the lock, held until release_output or the end of the
    process: an flock dies with its holder, so a killed run never blocks the next one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(f"{path}.lock", "a+")
    except OSError as e:
        raise RunError(f"cannot write {path}: {e.strerror or e}; choose another --out") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        other = lock.read().strip() or "another process"
        lock.close()
        raise RunError(f"{path} is being written by a run that is still going ({other}); wait for it, "
                       f"or choose another --out") from None
    if path.exists() and not (resuming or overwrite):
        release_output(lock)
        raise RunError(f"{path} already holds a run (step {read_step(path)}); continue it with --resume "
                       f"{path}, replace it with --overwrite, or choose another --out")
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
    lock.flush()
    return lock


def release_output(lock):
    Path(lock.name).unlink(missing_ok=True)
    lock.close()


class StopOnSignal:
    """The first Ctrl-C asks the loop to stop after the current step and save; a second one
    interrupts at once (the last checkpoint on disk stays intact either way). SIGTERM, what `kill`,
    a job scheduler's time limit or a preempted cloud machine sends, is treated the same way."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
