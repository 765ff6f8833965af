"""Shared by every test file: synthetic D4RL and Minari files, a tiny DT, the CLI harness and its
one-line-error checks, and a tiny model trained by train.py itself."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import train
from common.datafiles import MINARI_KEYS, REQUIRED_KEYS
from common.tasks import locomotion_task
from model import DecisionTransformer, DTConfig


ROOT = Path(__file__).resolve().parent.parent  # the repository, where the scripts are
S, A = 17, 6  # HalfCheetah's sizes, so synthetic checkpoints can be rolled out in HalfCheetah-v5
HOPPER = locomotion_task("Hopper-v5")
TINY = ["--batch-size", "8", "--context-len", "4", "--n-layer", "1", "--n-embd", "16"]
needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                    reason="torch.compile on a CPU needs a C++ compiler")


def write_d4rl(path, lengths, timeout_last=True, seed=0, extra_keys=True, state_dim=S, act_dim=A):
    """Episodes back to back in D4RL's flat layout. Actions are a fixed function of the state, so
    a model can learn them; episodes end on terminals (odd ones) or timeouts (even ones)."""
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    obs = rng.normal(size=(n, state_dim)).astype(np.float32)
    actions = np.tanh(obs[:, :act_dim] * 0.8 - obs[:, -act_dim:] * 0.5).astype(np.float32)
    rewards = rng.uniform(0, 10, n).astype(np.float32)
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    ends = np.cumsum(lengths) - 1
    for i, e in enumerate(ends):
        if i == len(ends) - 1 and not timeout_last:
            break
        (terminals if i % 2 else timeouts)[e] = True
    with h5py.File(path, "w") as f:
        for key, value in dict(observations=obs, actions=actions, rewards=rewards,
                               terminals=terminals, timeouts=timeouts).items():
            f[key] = value
        if extra_keys:  # the real D4RL files carry these; the loader must ignore them
            f["next_observations"] = obs
            f["infos/qpos"] = np.zeros((n, 9), np.float32)
            f["metadata/algorithm"] = "synthetic"
    return path


def write_minari(path, lengths, seed=0):
    """The same synthetic episodes in Minari's layout: one group per episode, one extra observation."""
    flat = write_d4rl(path.with_name("flat-" + path.name), lengths, seed=seed)
    with h5py.File(flat) as f:
        arrays = {k: f[k][()] for k in REQUIRED_KEYS}
    with h5py.File(path, "w") as f:
        f.attrs["env_spec"] = json.dumps({"id": "HalfCheetah-v5", "max_episode_steps": 1000})
        for i, (start, n) in enumerate(zip(np.cumsum([0, *lengths[:-1]]), lengths)):
            ep = f.create_group(f"episode_{i}")
            last_obs = np.ones((1, S), np.float32)
            ep["observations"] = np.concatenate([arrays["observations"][start:start + n], last_obs])
            for ours, theirs in MINARI_KEYS.items():
                if ours != "observations":
                    ep[theirs] = arrays[ours][start:start + n]
            ep.create_group("infos")
    return path, flat


def tiny_model(K=8, dropout=0.0):
    torch.manual_seed(0)
    return DecisionTransformer(DTConfig(state_dim=S, act_dim=A, context_len=K, n_layer=2, n_head=2,
                                        n_embd=32, dropout=dropout)).eval()


def random_window(B, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, K, S, generator=g), torch.rand(B, K, A, generator=g) * 2 - 1,
            torch.randn(B, K, 1, generator=g), torch.randint(0, 1000, (B, K), generator=g))


def run_cli(script, *args):
    """Run one of the project's scripts as a user would, from an empty working directory, so that a
    ckpt.pt or data/ folder a user has in the repository cannot change its outcome (train.py's
    default --out is ./ckpt.pt) and a test writes nothing there. A script at the top is named by
    its file ("train.py"), one in a folder by its module ("study.mazes", run with python -m)."""
    command = [str(ROOT / script)] if script.endswith(".py") else ["-m", script]
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, *command, *args], cwd=cwd, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def assert_one_line_error(proc, *words):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(w in last for w in words), proc.stderr


def assert_usage_error(proc, *words):
    """argparse's way: the usage line, then one line `PROG: error: ...`, exit status 2."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "error: " in last and all(w in last for w in words), proc.stderr


def edited_checkpoint(src, dest, **changes):
    ckpt = torch.load(src, weights_only=True)
    ckpt.update(changes)
    torch.save(ckpt, dest)
    return str(dest)


@pytest.fixture
def dataset(tmp_path):
    return write_d4rl(tmp_path / "halfcheetah-synthetic.hdf5", [60, 45, 80, 30, 50])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for a few steps by train.py itself; shared by the tests that need one."""
    tmp = tmp_path_factory.mktemp("trained")
    data = write_d4rl(tmp / "halfcheetah-synthetic.hdf5", [200] * 6)
    out = tmp / "ckpt.pt"
    train.main(["--data", str(data), "--max-steps", "80", "--batch-size", "16", "--context-len", "5",
                "--n-layer", "1", "--n-embd", "32", "--lr", "3e-3", "--log-every", "10",
                "--out", str(out)])
    return out


def mutated_copies(raw, folder, suffix, rng, flips=200):
    """Copies of a file's bytes cut short, with bytes flipped anywhere, and plain random bytes."""
    folder.mkdir()
    copies = [raw[:cut] for cut in [0, 1, 8, 100, len(raw) - 1, *rng.integers(0, len(raw), 60)]]
    for _ in range(flips):
        mutated = np.frombuffer(raw, np.uint8).copy()
        where = rng.integers(0, len(raw), rng.integers(1, 9))
        mutated[where] ^= rng.integers(1, 256, len(where)).astype(np.uint8)
        copies.append(mutated.tobytes())
    copies += [rng.bytes(int(rng.integers(1, 5000))) for _ in range(10)]
    for i, content in enumerate(copies):
        (folder / f"{i}{suffix}").write_bytes(content)
    return [folder / f"{i}{suffix}" for i in range(len(copies))]
