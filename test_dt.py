"""Tests: CPU only, no network, small synthetic data made under pytest's tmp_path.

Organised by the file under test, in the reading order (model, data, train, evaluate, then the
helpers beside them); the first tests are the Decision Transformer's specification."""
import csv
import hashlib
import http.server
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import bench
import checkpoint
import download
import evaluate
import experiment
import iql
import plot
import rollout
import train
import vecenv
import video
from checkpoint import CheckpointError, RunError
from data import delay_rewards, episode_ends, load_trajectories, returns_to_go, sample_batch
from datafiles import MINARI_KEYS, REQUIRED_KEYS, DataError
from model import BehaviourCloning, DecisionTransformer, DTConfig, configure_optimizer, padded_causal_mask

HERE = Path(__file__).resolve().parent
S, A = 17, 6  # HalfCheetah's sizes, so synthetic checkpoints can be rolled out in HalfCheetah-v5
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
    default --out is ./ckpt.pt) and a test writes nothing there."""
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, str(HERE / script), *args], cwd=cwd, capture_output=True,
                              text=True, timeout=120)


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


# --- model.py: the DT's specification first ---------------------------------------------------

def test_changing_later_tokens_never_changes_earlier_predictions():
    model, K, j = tiny_model(), 8, 5
    s, a, r, t = random_window(3, K)
    before = model(s, a, r, t)
    s2, a2, r2 = s.clone(), a.clone(), r.clone()
    # The prediction at step i sees R_<=i, s_<=i and a_<i, so everything from step j on, and the
    # action of step j-1, are in the future of steps 0..j-1.
    s2[:, j:] += 5.0
    r2[:, j:] -= 3.0
    a2[:, j - 1:] = -a2[:, j - 1:]
    after = model(s2, a2, r2, t)
    torch.testing.assert_close(after[:, :j], before[:, :j], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, j:], before[:, j:])  # the change did reach the later steps


def test_left_padding_gives_the_same_predictions_as_no_padding():
    model, K, T = tiny_model(), 8, 3
    s, a, r, t = random_window(2, K)
    unpadded = model(s[:, :T], a[:, :T], r[:, :T], t[:, :T])
    # Garbage, not zeros, in the padded slots: only the mask may hide them.
    mask = torch.zeros(2, K, dtype=torch.bool)
    mask[:, K - T:] = True
    sp, ap, rp, tp = random_window(2, K, seed=1)
    sp[:, K - T:], ap[:, K - T:], rp[:, K - T:], tp[:, K - T:] = s[:, :T], a[:, :T], r[:, :T], t[:, :T]
    padded = model(sp, ap, rp, tp, mask)
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[:, K - T:], unpadded, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.get_action(s[:, :T], a[:, :T], r[:, :T], t[:, :T]), unpadded[:, -1],
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("T", [1, 8, 13])  # a first step, a full window, a history longer than K
def test_get_action_is_the_full_forward_at_the_last_step(T):
    K = 8
    torch.manual_seed(0)
    model = DecisionTransformer(DTConfig(state_dim=S, act_dim=A, context_len=K, n_layer=3, n_head=4,
                                         n_embd=32, dropout=0.0)).eval()
    s, a, r, t = random_window(4, T)
    full = model(s[:, -K:], a[:, -K:], r[:, -K:], t[:, -K:])[:, -1]
    torch.testing.assert_close(model.get_action(s, a, r, t), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_forward_is_every_token_through_every_block(padded):
    """forward's shortcut, the last block computing only the s_t tokens that predict actions, is
    the plain transformer: all 3K tokens through every block, the s_t tokens' outputs read."""
    torch.manual_seed(0)
    model = DecisionTransformer(DTConfig(state_dim=S, act_dim=A, context_len=8, n_layer=3, n_head=4,
                                         n_embd=32, dropout=0.0)).eval()
    s, a, r, t = random_window(3, 8)
    mask = torch.arange(8).expand(3, 8) >= torch.tensor([[0], [3], [7]]) if padded else None
    x = model.embed(s, a, r, t)
    for block in model.blocks:
        x = block(x, None if mask is None else padded_causal_mask(mask))
    every_token = torch.tanh(model.predict_action(model.ln_f(x)[:, 1::3]))
    torch.testing.assert_close(model(s, a, r, t, mask), every_token, rtol=0, atol=1e-5)


def test_weight_decay_only_on_matrices():
    opt = configure_optimizer(tiny_model(), 1e-3, 0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])


# --- data.py ----------------------------------------------------------------------------------

def test_episodes_split_on_terminals_and_timeouts_and_keep_a_partial_tail(tmp_path):
    lengths = [7, 5, 9, 4]
    path = write_d4rl(tmp_path / "halfcheetah-x.hdf5", lengths, timeout_last=False)
    data, env_id = load_trajectories(path)
    assert env_id == "HalfCheetah-v5"
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    assert data.episode_start.tolist() == np.repeat(starts, lengths).tolist()
    assert data.timesteps.tolist() == [i for n in lengths for i in range(n)]
    with h5py.File(path) as f:
        rewards = f["rewards"][()]
    np.testing.assert_allclose(data.episode_returns, [rewards[s:s + n].sum() for s, n in zip(starts, lengths)],
                               rtol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_returns_to_go_match_a_brute_force_sum(gamma):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=40)
    terminals, timeouts = np.zeros(40, bool), np.zeros(40, bool)
    terminals[9], timeouts[24] = True, True  # episodes [0,9], [10,24], and a partial [25,39]
    got = returns_to_go(rewards, episode_ends(terminals, timeouts), gamma)
    for start, end in [(0, 9), (10, 24), (25, 39)]:
        for t in range(start, end + 1):
            expected = sum(gamma ** (k - t) * rewards[k] for k in range(t, end + 1))
            assert got[t] == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_delayed_rewards_keep_each_episode_total_and_first_return_to_go(tmp_path):
    lengths = [7, 5, 9, 4]
    path = write_d4rl(tmp_path / "halfcheetah-x.hdf5", lengths, timeout_last=False)  # partial tail too
    dense, _ = load_trajectories(path)
    delayed, _ = load_trajectories(path, reward_mode="delayed")
    with h5py.File(path) as f:
        rewards, ends = f["rewards"][()], episode_ends(f["terminals"][()], f["timeouts"][()])
    moved = delay_rewards(rewards, ends)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    for s, n in zip(starts, lengths):
        total = rewards[s:s + n].astype(np.float64).sum()
        assert moved[s:s + n].sum() == pytest.approx(total, rel=1e-12)
        assert (moved[s:s + n - 1] == 0).all()  # all of it on the last step
        # The same first return-to-go, then no step-by-step signal until the episode is over.
        assert delayed.returns_to_go[s].item() == pytest.approx(dense.returns_to_go[s].item(), rel=1e-6)
        assert (delayed.returns_to_go[s:s + n] == delayed.returns_to_go[s]).all()
        assert not (dense.returns_to_go[s:s + n] == dense.returns_to_go[s]).all()
    np.testing.assert_array_equal(delayed.episode_returns, dense.episode_returns)  # true returns
    assert torch.equal(delayed.states, dense.states) and torch.equal(delayed.actions, dense.actions)


def test_top_pct_keeps_the_episodes_with_the_best_returns(tmp_path):
    lengths = [5, 8, 6, 7, 9, 4, 10, 3, 6, 5]
    per_step = [3.0, 9.0, 1.0, 7.0, 2.0, 8.0, 0.5, 30.0, 4.0, 6.0]  # returns: lengths * per_step
    path = write_d4rl(tmp_path / "halfcheetah-x.hdf5", lengths)
    with h5py.File(path, "a") as f:
        f["rewards"][:] = np.repeat(per_step, lengths)
        f["observations"][:, 0] = np.repeat(np.arange(10), lengths)  # each row says its episode
    returns = np.array(lengths) * per_step  # 15 72 6 49 18 32 5 90 24 30
    for pct, best in [(30, [1, 3, 7]), (10, [7]), (1, [7]), (100, list(range(10)))]:
        data, _ = load_trajectories(path, top_pct=pct)
        np.testing.assert_allclose(data.episode_returns, returns[best])  # in file order
        assert data.episodes_in_file == 10
        raw = data.states * data.norm.state_std + data.norm.state_mean  # statistics of the kept rows only
        assert torch.round(raw[:, 0]).long().tolist() == np.repeat(best, np.array(lengths)[best]).tolist()
        assert data.episode_start.tolist() == np.repeat(
            np.concatenate(([0], np.cumsum(np.array(lengths)[best])[:-1])), np.array(lengths)[best]).tolist()
        assert data.returns_to_go[0].item() == pytest.approx(returns[best[0]] / 1000, rel=1e-6)


def test_states_are_normalized_and_returns_scaled(dataset):
    data, _ = load_trajectories(dataset)
    torch.testing.assert_close(data.states.mean(0), torch.zeros(S), atol=1e-4, rtol=0)
    torch.testing.assert_close(data.states.std(0, unbiased=False), torch.ones(S), atol=1e-3, rtol=0)
    assert data.returns_to_go[0].item() == pytest.approx(data.episode_returns[0] / 1000, rel=1e-5)


def test_windows_are_sampled_in_proportion_to_episode_length(tmp_path):
    lengths = [10, 30, 60]
    path = write_d4rl(tmp_path / "halfcheetah-x.hdf5", lengths)
    with h5py.File(path, "a") as f:  # observation 0 := episode index, to read it back off a window
        f["observations"][:, 0] = np.repeat(np.arange(3), lengths)
    data, _ = load_trajectories(path)
    states, *_ = sample_batch(data, 30000, 4, torch.Generator().manual_seed(0))
    # Normalization is increasing, so the sorted distinct values are episodes 0, 1, 2.
    _, episode = np.unique(states[:, -1, 0].numpy(), return_inverse=True)
    freq = np.bincount(episode, minlength=3) / len(episode)
    np.testing.assert_allclose(freq, np.array(lengths) / sum(lengths), atol=0.015)


def test_windows_hold_the_right_rows_and_pad_only_before_the_episode_start(dataset):
    data, _ = load_trajectories(dataset)
    K = 10
    states, actions, rtg, timesteps, mask = sample_batch(data, 500, K, torch.Generator().manual_seed(1))
    assert states.shape == (500, K, S) and actions.shape == (500, K, A) and rtg.shape == (500, K, 1)
    assert mask[:, -1].all() and (~mask[:, 0]).any()
    # Real steps are consecutive timesteps of one episode; padding is all zeros and only on the left.
    real_t = torch.where(mask, timesteps, -1)
    for row_t, row_m, row_s in zip(real_t, mask, states):
        n = int(row_m.sum())
        assert row_m[K - n:].all() and not row_m[:K - n].any()
        t = row_t[K - n:]
        assert (t.diff() == 1).all() and (n == K or t[0] == 0)
        assert (row_s[:K - n] == 0).all()
        start = int(torch.nonzero((data.timesteps == t[-1]) & (data.states == row_s[-1]).all(1))[0])
        torch.testing.assert_close(row_s[K - n:], data.states[start - n + 1:start + 1])


# --- datafiles.py: reading and checking files -------------------------------------------------

@pytest.mark.parametrize("make_bad, problem", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b"this is not an HDF5 file at all" * 10), "cannot be read as HDF5"),
    (lambda p: h5py.File(p, "w").create_dataset("observations", data=np.zeros((5, 3))), "missing key"),
])
def test_bad_data_files_raise_a_one_line_error_naming_the_file(tmp_path, make_bad, problem):
    path = tmp_path / "bad.hdf5"
    make_bad(path)
    with pytest.raises(DataError) as err:
        load_trajectories(path)
    assert problem in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_mismatched_lengths_and_nan_are_refused(tmp_path):
    path = write_d4rl(tmp_path / "a.hdf5", [10, 10])
    with h5py.File(path, "a") as f:
        del f["rewards"]
        f["rewards"] = np.zeros(19, np.float32)
    with pytest.raises(DataError, match="'rewards' has 19 rows"):
        load_trajectories(path)
    path = write_d4rl(tmp_path / "b.hdf5", [10, 10])
    with h5py.File(path, "a") as f:
        f["observations"][3, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        load_trajectories(path)


def structural_mutations(f, rng):
    """Edits of an open D4RL file, one per yield, each a way real files go wrong."""
    n = len(f["observations"])
    for key in REQUIRED_KEYS:
        original = f[key][()]
        for bad in (original[:-1], original[:0], original[..., None], np.float32(1.0),
                    np.array([b"text"] * n), np.zeros((n, 0) if original.ndim == 2 else (0,), np.float32)):
            del f[key]
            f[key] = bad
            yield f"{key} as {bad.dtype}{bad.shape}"
        del f[key]
        f.create_group(key)
        yield f"{key} as a group"
        del f[key]
        yield f"{key} deleted"
        f[key] = original
        if original.dtype.kind == "f":
            for value in (np.nan, np.inf, -np.inf, 3e38):
                f[key][tuple(rng.integers(0, s) for s in original.shape)] = value
                yield f"{key} with {value}"
                f[key][...] = original


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


def test_hundreds_of_mutated_files_load_or_fail_with_one_line(tmp_path):
    """Truncations, random bytes, flipped bytes anywhere in the file (metadata included), deleted
    keys, wrong shapes and NaNs, in HDF5 and (with pyarrow) in Parquet: each file loads into finite
    tensors or raises DataError with one line naming the file; nothing else escapes."""
    base = write_d4rl(tmp_path / "base.hdf5", [30, 20, 25])
    raw, rng = base.read_bytes(), np.random.default_rng(0)
    files = mutated_copies(raw, tmp_path / "hdf5", ".hdf5", rng)
    if importlib.util.find_spec("pyarrow"):  # the same for the Parquet reader
        parquet = write_parquet(tmp_path / "base.parquet", base)
        files += mutated_copies(parquet.read_bytes(), tmp_path / "parquet", ".parquet", rng, flips=100)
    work = tmp_path / "work.hdf5"
    work.write_bytes(raw)
    with h5py.File(work, "a") as f:
        for i, _ in enumerate(structural_mutations(f, rng)):
            f.flush()
            files.append(tmp_path / f"edited{i}.hdf5")
            files[-1].write_bytes(work.read_bytes())
    assert len(files) > 300
    loaded = 0
    for path in files:
        try:
            data, _ = load_trajectories(path)
        except DataError as e:
            assert str(path) in str(e) and "\n" not in str(e), str(e)
            continue
        loaded += 1
        assert len(data.actions) == len(data.states) == len(data.returns_to_go) == data.num_steps > 0
        for t in (data.states, data.actions, data.returns_to_go, data.norm.state_mean, data.norm.state_std):
            assert torch.isfinite(t).all(), path
    assert 0 < loaded < len(files)  # both outcomes happened: the mutations reach data and metadata


def test_minari_files_load_like_their_d4rl_twin(tmp_path):
    lengths = [7, 12, 5, 9, 8, 6, 10, 11, 4, 13, 3]  # 11 episodes: episode_10 sorts after episode_9
    minari, flat = write_minari(tmp_path / "main_data.hdf5", lengths)
    got, env_id = load_trajectories(minari)
    want, _ = load_trajectories(flat)
    assert env_id == "HalfCheetah-v5"
    for name in ("states", "actions", "returns_to_go", "timesteps", "episode_start"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)
    with h5py.File(minari, "a") as f:
        del f["episode_3/actions"]
        f["episode_3/actions"] = np.zeros((0, A), np.float32)
    with pytest.raises(DataError, match=r"main_data.hdf5: episode_3: the episode has no steps"):
        load_trajectories(minari)


def episodes_of(path):
    """A D4RL file's episodes: [(observations, actions, rewards, terminal?, next observation)]."""
    with h5py.File(path) as f:
        arrays = {k: f[k][()] for k in REQUIRED_KEYS}
    ends = np.flatnonzero(arrays["terminals"] | arrays["timeouts"])
    out = []
    for start, end in zip(np.r_[0, ends[:-1] + 1], ends):
        s = slice(start, end + 1)
        out.append((arrays["observations"][s], arrays["actions"][s], arrays["rewards"][s],
                    bool(arrays["terminals"][end])))
    return out


def assert_same_trajectories(got, want):
    for name in ("states", "actions", "returns_to_go", "timesteps", "episode_start"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)
    np.testing.assert_array_equal(got.episode_returns, want.episode_returns)


def test_minari_datasets_load_by_id_folder_and_file(tmp_path, monkeypatch):
    minari = pytest.importorskip("minari", reason="the minari package writes the test's dataset")
    from minari.data_collector import EpisodeBuffer

    flat = write_d4rl(tmp_path / "halfcheetah-twin.hdf5", [7, 12, 5, 9])
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    buffers = [EpisodeBuffer(id=i, observations=np.concatenate([obs, obs[-1:] + 1]), actions=act,
                             rewards=rew.astype(np.float64), terminations=np.r_[np.zeros(len(obs) - 1, bool), done],
                             truncations=np.r_[np.zeros(len(obs) - 1, bool), not done], infos={})
               for i, (obs, act, rew, done) in enumerate(episodes_of(flat))]
    with pytest.warns(UserWarning):  # minari asks for a description and an eval env; not needed here
        minari.create_dataset_from_buffers("mujoco/halfcheetah/test-v0", buffers, env="HalfCheetah-v5",
                                           algorithm_name="test", author="test", author_email="t@example.com",
                                           code_permalink="none")
    want, _ = load_trajectories(flat)
    folder = download.locate("minari:mujoco/halfcheetah/test-v0")
    for given in (folder, folder / "data", folder / "data" / "main_data.hdf5"):
        got, env_id = load_trajectories(given)
        assert env_id == "HalfCheetah-v5"  # from metadata.json, as Minari 0.5 writes it
        assert_same_trajectories(got, want)
    train.main(["--data", "minari:mujoco/halfcheetah/test-v0", "--max-steps", "2", *TINY,
                "--out", str(tmp_path / "minari.pt")])  # by id, and no --env
    assert torch.load(tmp_path / "minari.pt", weights_only=True)["env_id"] == "HalfCheetah-v5"


def test_a_missing_minari_dataset_is_downloaded_or_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "minari", None)  # as if it were not installed
    with pytest.raises(download.DownloadError, match=r"minari:mujoco/hopper/expert-v0 is not in .*pip install 'minari\[hf\]'"):
        download.locate("minari:mujoco/hopper/expert-v0")
    fetched = []

    class FakeMinari:
        @staticmethod
        def download_dataset(dataset_id):
            fetched.append(dataset_id)
            (tmp_path / dataset_id / "data").mkdir(parents=True)
            write_minari(tmp_path / dataset_id / "data" / "main_data.hdf5", [5, 6])

    monkeypatch.setitem(sys.modules, "minari", FakeMinari)
    folder = download.locate("minari:mujoco/hopper/expert-v0")
    assert fetched == ["mujoco/hopper/expert-v0"] and folder == tmp_path / "mujoco/hopper/expert-v0"
    download.locate("minari:mujoco/hopper/expert-v0")  # on disk now: not fetched again
    assert len(fetched) == 1


def write_parquet(path, d4rl_path, **changes):
    """The same episodes in the Hugging Face Decision Transformer dataset's layout: one row each."""
    pa = pytest.importorskip("pyarrow", reason="pyarrow is optional; it reads Parquet")
    import pyarrow.parquet as pq

    rows = episodes_of(d4rl_path)
    columns = {
        "observations": pa.array([o.tolist() for o, *_ in rows], pa.list_(pa.list_(pa.float32()))),
        "actions": pa.array([a.tolist() for _, a, *_ in rows], pa.list_(pa.list_(pa.float32()))),
        "rewards": pa.array([r.tolist() for _, _, r, _ in rows], pa.list_(pa.float32())),
        "dones": pa.array([[False] * (len(o) - 1) + [done] for o, _, _, done in rows], pa.list_(pa.bool_())),
    }
    columns.update(changes)
    pq.write_table(pa.table({k: v for k, v in columns.items() if v is not None}), path)
    return path


def test_parquet_trajectories_load_like_their_hdf5_twin(tmp_path):
    flat = write_d4rl(tmp_path / "twin.hdf5", [7, 12, 5, 9, 4], timeout_last=True)
    folder = tmp_path / "halfcheetah-expert-v2" / "train"
    folder.mkdir(parents=True)
    parquet = write_parquet(folder / "0000.parquet", flat)
    want, _ = load_trajectories(flat)
    for given in (parquet, folder):
        got, env_id = load_trajectories(given)
        assert env_id == "HalfCheetah-v5"  # from the configuration's folder name
        assert_same_trajectories(got, want)


def test_bad_parquet_files_fail_in_one_line(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is optional; it reads Parquet")
    flat = write_d4rl(tmp_path / "twin.hdf5", [7, 12, 5])
    ragged = pa.array([np.zeros((n, A)).tolist() for n in (7, 11, 5)], pa.list_(pa.list_(pa.float32())))
    nan_rewards = pa.array([[0.0] * 7, [0.0] * 11 + [float("nan")], [0.0] * 5], pa.list_(pa.float32()))
    texts = pa.array([["a"] * 7, ["b"] * 12, ["c"] * 5], pa.list_(pa.string()))
    for changes, problem in [({"dones": None}, "missing column(s) dones"),
                             ({"actions": ragged}, "row 1: column 'actions' has 11 steps but 'observations' has 12"),
                             ({"rewards": nan_rewards}, "'rewards' has NaN or Inf values"),
                             ({"rewards": texts}, "column 'rewards' is not a list of steps")]:
        path = write_parquet(tmp_path / "bad.parquet", flat, **changes)
        with pytest.raises(DataError) as err:
            load_trajectories(path)
        assert problem in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="cannot be read as Parquet"):
        load_trajectories(tmp_path / "junk.parquet")


def test_hugging_face_data_names_what_it_needs(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    with pytest.raises(download.DownloadError, match="pip install huggingface_hub pyarrow"):
        download.locate("hf:hopper-medium-v2")
    with pytest.raises(download.DownloadError, match="unknown Hugging Face configuration 'hopper-random-v2'"):
        download.locate("hf:hopper-random-v2")


# --- train.py ---------------------------------------------------------------------------------

def test_lr_schedule_warms_up_then_decays():
    lrs = [train.get_lr(s, 100, 1e-3) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_a_few_training_steps_lower_the_loss(trained):
    with open(trained.with_suffix(".csv")) as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 8
    assert losses[-1] < 0.6 * losses[0]


def test_behaviour_cloning_baseline_trains_saves_and_evaluates(tmp_path, capsys):
    data = write_d4rl(tmp_path / "halfcheetah-bc.hdf5", [200] * 6)
    out = tmp_path / "bc.pt"
    train.main(["--data", str(data), "--model", "bc", "--max-steps", "150", "--batch-size", "16",
                "--lr", "3e-3", "--log-every", "10", "--out", str(out)])
    with open(out.with_suffix(".csv")) as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert losses[-1] < 0.5 * losses[0]
    model, _, ckpt = checkpoint.load_checkpoint(out)
    assert isinstance(model, BehaviourCloning) and ckpt["model_config"]["kind"] == "bc"
    # The action depends on the current state only: history and return-to-go are ignored.
    s, a, r, t = random_window(3, 5)
    s2, a2, r2, t2 = random_window(3, 5, seed=1)
    s2[:, -1] = s[:, -1]
    torch.testing.assert_close(model.get_action(s, a, r, t), model.get_action(s2, a2, r2, t2))
    capsys.readouterr()
    evaluate.main([str(out), "--target", "0", "12000", "--episodes", "2", "--json"])
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(results) == 1 and results[0]["model"] == "bc" and len(results[0]["returns"]) == 2


def test_reward_mode_and_top_pct_reach_training_and_evaluation(tmp_path, capsys, monkeypatch):
    data = write_d4rl(tmp_path / "halfcheetah-x.hdf5", [100] * 6)
    weights = {}
    for model, mode in [("bc", "dense"), ("bc", "delayed"), ("dt", "dense"), ("dt", "delayed")]:
        out = tmp_path / f"{model}-{mode}.pt"
        train.main(["--data", str(data), "--model", model, "--reward-mode", mode, "--top-pct", "50",
                    "--max-steps", "20", *TINY, "--out", str(out)])
        weights[model, mode] = torch.load(out, weights_only=True)["model"]
    assert "300 steps in 3 episodes (the best 50% of 6)" in capsys.readouterr().out
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(weights["bc", "dense"], weights["bc", "delayed"])  # BC never sees a reward
    assert not same(weights["dt", "dense"], weights["dt", "delayed"])

    # Evaluating a delayed-reward DT holds its return-to-go at the target, as in its training data;
    # a dense one counts the collected reward down.
    seen = []
    get_action = DecisionTransformer.get_action
    monkeypatch.setattr(DecisionTransformer, "get_action",
                        lambda self, s, a, r, *rest: (seen.append(r[:, -1, 0].clone()), get_action(self, s, a, r, *rest))[1])
    for mode in ("delayed", "dense"):
        seen.clear()
        evaluate.main([str(tmp_path / f"dt-{mode}.pt"), "--target", "5000", "--episodes", "2", "--json"])
        rtg = torch.stack(seen)
        assert len(seen) == 1000 and (rtg[0] == 5.0).all()
        assert (rtg == 5.0).all() == (mode == "delayed")


@pytest.mark.parametrize("body, env_id, state_dim, act_dim", [
    ("hopper", "Hopper-v5", 11, 3), ("walker2d", "Walker2d-v5", 17, 6)])
def test_hopper_and_walker_train_and_evaluate_with_early_terminations(tmp_path, capsys, body, env_id,
                                                                     state_dim, act_dim):
    # Episodes of uneven length that end by falling over (terminals), as Hopper and Walker2d do.
    data = write_d4rl(tmp_path / f"{body}-synthetic.hdf5", [40, 15, 70, 9, 33, 25], state_dim=state_dim,
                      act_dim=act_dim)
    out = tmp_path / f"{body}.pt"
    train.main(["--data", str(data), "--max-steps", "20", *TINY, "--out", str(out)])
    assert torch.load(out, weights_only=True)["env_id"] == env_id
    capsys.readouterr()
    evaluate.main([str(out), "--episodes", "3", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["env"] == env_id and result["target"] == rollout.DEFAULT_TARGETS[env_id.split("-")[0]]
    assert len(result["returns"]) == 3


@needs_compiler
def test_a_compiled_forward_gives_the_eager_loss_and_gradients(tmp_path):
    data, _ = load_trajectories(write_d4rl(tmp_path / "halfcheetah-c.hdf5", [50] * 4))
    batch = sample_batch(data, 8, 4, torch.Generator().manual_seed(0))
    results = {}
    for flag in ("--no-compile", "--compile"):
        args = train.parse_args([*TINY, flag, "--dropout", "0", "--no-amp"])
        torch.manual_seed(0)
        model, train_model, optimizer, amp = train.setup_training(train.model_config(args, data), args, "cpu")
        assert (train_model is not model) == (flag == "--compile")
        states, actions, rtg, timesteps, mask = batch
        loss = train.action_loss(train_model(states, actions, rtg, timesteps, mask), actions, mask)
        loss.backward()
        results[flag] = loss.item(), [p.grad.clone() for p in model.parameters()]
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results.values()
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    for e, c in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6)


def test_one_gpu_compiles_to_cuda_graphs_but_torchrun_and_the_cpu_do_not(monkeypatch):
    assert train.compile_mode("cpu") is None  # no graphs to replay on a CPU
    assert train.compile_mode("cuda") == "reduce-overhead"
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert train.compile_mode("cuda:1") is None  # DDP's gradient hooks: the default mode


def test_a_target_of_zero_is_asked_for_not_replaced_by_the_default(tmp_path, capsys):
    data = write_d4rl(tmp_path / "halfcheetah-t.hdf5", [50] * 4)
    for target, shown in (("0", "at target 0"), (None, "at target 12000")):
        out = tmp_path / f"t{target}.pt"
        train.main(["--data", str(data), "--max-steps", "2", "--eval-every", "2", "--eval-episodes", "1",
                    *TINY, "--out", str(out)] + (["--target", target] if target else []))
        assert shown in capsys.readouterr().out

def test_compile_without_a_cpp_compiler_is_one_line_not_a_deep_inductor_error(tmp_path, monkeypatch):
    data = write_d4rl(tmp_path / "halfcheetah-cc.hdf5", [50] * 4)
    monkeypatch.setattr(train.shutil, "which", lambda name: None)
    with pytest.raises(RunError, match=r"--compile on a CPU needs a C\+\+ compiler"):
        train.main(["--data", str(data), "--max-steps", "2", *TINY, "--compile", "--out", str(tmp_path / "c.pt")])
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("model", ["dt", "iql", pytest.param("dt-compiled", marks=needs_compiler),
                                   pytest.param("iql-compiled", marks=needs_compiler)])
def test_resume_continues_a_run_exactly(tmp_path, monkeypatch, model):
    data = write_d4rl(tmp_path / "halfcheetah-r.hdf5", [50] * 4)
    # The DT's dropout stays at 0.1, so the global RNG matters as much as the sampler's; IQL's
    # target networks and its actor's learning-rate schedule must come back too; a compiled
    # forward must give the same steps after a restart as before it.
    iql_size = ["--model", "iql", "--batch-size", "8", "--n-embd", "16"]
    size = {"dt": TINY, "dt-compiled": [*TINY, "--compile"], "iql": iql_size, "iql-compiled": [*iql_size, "--compile"]}
    run = ["--data", str(data), "--max-steps", "12", "--log-every", "5", "--save-every", "5", *size[model]]
    straight, split = tmp_path / "straight.pt", tmp_path / "split.pt"
    train.main(run + ["--out", str(straight)])

    calls, real_step = 0, train.sample_and_step

    def step_then_ctrl_c(*args):
        nonlocal calls
        calls += 1
        if calls == 6:  # Ctrl-C arrives during step 6 of 12
            signal.raise_signal(signal.SIGINT)
        return real_step(*args)

    monkeypatch.setattr(train, "sample_and_step", step_then_ctrl_c)
    ctrl_c = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    train.main(run + ["--out", str(split)])
    assert torch.load(split, weights_only=True)["step"] == 6
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # handler restored
    monkeypatch.undo()
    train.main(["--resume", str(split)])

    a, b = torch.load(straight, weights_only=True), torch.load(split, weights_only=True)
    assert a["step"] == b["step"] == 12
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in state.items())
    with open(split.with_suffix(".csv")) as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["5", "6", "10", "12"]


def test_resume_refuses_other_data_and_changed_settings(tmp_path, trained):
    ckpt = edited_checkpoint(trained, tmp_path / "copy.pt")
    other = write_d4rl(tmp_path / "halfcheetah-other.hdf5", [40, 40], seed=5)
    with pytest.raises(CheckpointError, match="trained on other data"):
        train.main(["--resume", ckpt, "--data", str(other)])
    proc = run_cli("train.py", "--resume", ckpt, "--lr", "0.1")
    assert proc.returncode == 2 and "only --data may come with it, not --lr" in proc.stderr
    plain = torch.load(trained, weights_only=True)
    del plain["rng"]  # what a model-only checkpoint looks like
    torch.save(plain, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="no training state"):
        train.main(["--resume", str(tmp_path / "plain.pt")])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig):
    data = write_d4rl(tmp_path / "halfcheetah-c.hdf5", [50] * 4)
    out = tmp_path / "run.pt"
    proc = subprocess.Popen([sys.executable, "train.py", "--data", str(data), "--max-steps", "100000",
                             "--log-every", "1", *TINY, "--out", str(out)],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out.with_suffix(".csv"), time.time() + 90
    while not (log.exists() and len(log.read_text().splitlines()) >= 4):  # a few steps in
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)
    # A second run aimed at the same files while this one is going is refused, naming it.
    second = run_cli("train.py", "--data", str(data), "--max-steps", "5", *TINY, "--out", str(out), "--overwrite")
    assert_one_line_error(second, str(out), "still going", f"pid {proc.pid}")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    step = torch.load(out, weights_only=True)["step"]
    assert 3 <= step < 100000 and f"python train.py --resume {out}" in stdout
    assert log.read_text().splitlines()[-1].startswith(f"{step},")


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = write_d4rl(tmp_path / "halfcheetah-n.hdf5", [50] * 4)
    out, calls, real_loss = tmp_path / "nan.pt", 0, train.action_loss

    def loss_that_blows_up_at_step_8(*args):
        nonlocal calls
        calls += 1
        return real_loss(*args) * (float("nan") if calls >= 8 else 1.0)

    monkeypatch.setattr(train, "action_loss", loss_that_blows_up_at_step_8)
    with pytest.raises(RunError, match=r"became nan at step 8; stopped \(.*nan.pt keeps step 5\)"):
        train.main(["--data", str(data), "--max-steps", "20", "--log-every", "3", "--save-every", "5",
                    *TINY, "--out", str(out)])
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_bad_training_arguments_are_refused_before_any_work(tmp_path):
    data = str(write_d4rl(tmp_path / "halfcheetah-a.hdf5", [30, 30]))
    for flags, words in [(["--epochs", "-1"], "--epochs must be above 0"), (["--epochs", "0"], "--epochs"),
                         (["--max-steps", "0"], "--max-steps must be at least 1"),
                         (["--batch-size", "0"], "--batch-size must be at least 1"),
                         (["--n-embd", "30", "--n-head", "4"], "multiple of --n-head")]:
        assert_usage_error(run_cli("train.py", "--data", data, *flags, "--out", str(tmp_path / "x.pt")), words)
    assert not (tmp_path / "x.pt").exists()
    # A folder where a file is expected says so, instead of "no such file".
    assert_one_line_error(run_cli("train.py", "--data", str(tmp_path)), str(tmp_path), "is a folder")


def test_a_run_reports_its_budget_precision_and_full_progress(tmp_path):
    data = write_d4rl(tmp_path / "halfcheetah-p.hdf5", [50] * 4)
    proc = run_cli("train.py", "--data", str(data), "--max-steps", "7", *TINY, "--out", str(tmp_path / "p.pt"))
    assert proc.returncode == 0, proc.stderr
    assert "'epochs': None, 'max_steps': 7" in proc.stdout  # the budget that counts, not the default
    precision = "bf16 autocast" if train.use_bf16(train.parse_args([]), "cpu") else "fp32"
    assert f"device cpu, {precision}" in proc.stdout
    assert "7/7" in proc.stderr  # the progress bar counts the last step too


# --- iql.py: the value-based baseline -------------------------------------------------------------

def iql_args(**changes):
    return train.parse_args(["--model", "iql", *[x for k, v in changes.items() for x in (f"--{k}", str(v))]])


def test_expectile_loss_weighs_q_above_v_by_the_expectile():
    diff = torch.tensor([2.0, -1.0, 0.5])  # Q - V
    # (0.7 * 2^2 + 0.3 * 1^2 + 0.7 * 0.5^2) / 3, worked by hand
    assert iql.expectile_loss(diff, 0.7).item() == pytest.approx((2.8 + 0.3 + 0.175) / 3)
    assert iql.expectile_loss(diff, 0.5).item() == pytest.approx((4 + 1 + 0.25) / 3 / 2)  # half the MSE


@pytest.mark.parametrize("with_next_observations", [True, False])
def test_transitions_respect_terminals_time_limits_and_delayed_rewards(tmp_path, with_next_observations):
    lengths = [4, 3, 5]  # episode 1 ends by falling (terminals), episodes 0 and 2 by the time limit
    path = write_d4rl(tmp_path / "hopper-t.hdf5", lengths, extra_keys=False, state_dim=11, act_dim=3)
    with h5py.File(path, "a") as f:
        obs, rewards = f["observations"][()], f["rewards"][()].astype(np.float64)
        if with_next_observations:
            f["next_observations"] = obs + 100.0  # nothing like the next row: which one is used shows
    data, _ = load_trajectories(path, transitions=True)
    raw = lambda x: x * data.norm.state_std + data.norm.state_mean  # noqa: E731
    starts, ends = [0, 4, 7], [3, 6, 11]
    totals = [rewards[s:e + 1].sum() for s, e in zip(starts, ends)]
    scale = 1000 / (max(totals) - min(totals))  # the IQL paper's reward scaling for locomotion
    torch.testing.assert_close(data.rewards, torch.tensor(rewards * scale, dtype=torch.float32))
    assert data.terminals.tolist() == [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]  # only the fall ends the MDP
    inside = [i for i in range(12) if i not in ends]
    torch.testing.assert_close(data.next_states[inside], data.states[[i + 1 for i in inside]])
    for e in (3, 11):  # cut by the time limit: bootstrapped, from the file's s' or the step's own state
        expected = obs[e] + 100.0 if with_next_observations else obs[e]
        torch.testing.assert_close(raw(data.next_states[e]), torch.tensor(expected), rtol=0, atol=1e-4)

    delayed, _ = load_trajectories(path, transitions=True, reward_mode="delayed")
    assert delayed.terminals.tolist() == [1.0 if i in ends else 0.0 for i in range(12)]  # paid, then over
    expected = np.zeros(12)
    expected[ends] = np.array(totals) * scale  # every episode's whole return on its last step
    torch.testing.assert_close(delayed.rewards, torch.tensor(expected, dtype=torch.float32))


def test_the_td_target_does_not_bootstrap_past_a_termination():
    torch.manual_seed(0)
    model = iql.IQL(DTConfig(kind="iql", state_dim=S, act_dim=A, n_layer=2, n_embd=32))
    args = iql_args()
    s, a = torch.randn(2, S), torch.rand(2, A) * 2 - 1
    r, s_next = torch.tensor([1.0, 1.0]), torch.randn(2, S)
    for terminal, changes in (([1.0, 1.0], False), ([0.0, 1.0], True)):
        batch = (s, a, r, s_next, torch.tensor(terminal))
        moved = s_next.clone()
        moved[0] += 3.0  # a different s' for transition 0 only
        before = iql.iql_loss(model, batch, args)
        after = iql.iql_loss(model, (s, a, r, moved, torch.tensor(terminal)), args)
        assert (before != after) == changes


def test_iql_trains_evaluates_and_counts_an_epoch_in_transitions(tmp_path, capsys):
    data = write_d4rl(tmp_path / "halfcheetah-iql.hdf5", [200] * 6)
    out = tmp_path / "iql.pt"
    train.main(["--data", str(data), "--model", "iql", "--epochs", "2", "--batch-size", "64", "--n-embd", "32",
                "--log-every", "5", "--eval-every", "10", "--eval-episodes", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "'expectile': 0.7, 'temperature': 3.0, 'discount': 0.99, 'tau': 0.005" in printed
    assert "38 steps (19 per epoch)" in printed  # 1200 transitions, 64 a batch
    saved = torch.load(out, weights_only=True)
    assert saved["model_config"]["kind"] == "iql"
    # The target networks moved, slowly: Polyak averaging, not a copy.
    q, target = saved["model"]["q1.0.weight"], saved["model"]["q1_target.0.weight"]
    assert not torch.equal(q, target)
    evaluate.main([str(out), "--target", "0", "12000", "--episodes", "2", "--json"])
    captured = capsys.readouterr()
    results = [json.loads(line) for line in captured.out.splitlines()]
    assert len(results) == 1 and results[0]["model"] == "iql" and "evaluating once" in captured.err
    assert_usage_error(run_cli("train.py", "--data", str(data), "--expectile", "0.9"), "for --model iql only")
    if importlib.util.find_spec("matplotlib"):  # V(s_t) along the data's episodes, as the README draws it
        png = tmp_path / "values.png"
        plot.main(["--values", str(out), "--data", str(data), "--out", str(png)])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_value_ranking_counts_the_pairs_of_episodes_in_the_right_order():
    values = [np.array([1.0, 1.0]), np.array([3.0]), np.array([2.0, 2.0, 2.0])]
    # returns rank the episodes 1 > 0 > 2; V's means rank them 1 > 2 > 0: pairs (1,0) and (1,2) right
    assert plot.ranking(values, np.array([5.0, 9.0, 1.0])) == pytest.approx(2 / 3)
    assert np.isnan(plot.ranking(values, np.array([5.0, 5.0, 5.0])))  # no better episode to rank


def test_value_summary_says_how_v_ranks_each_half_and_whose_actions_the_actor_weighs():
    values = [np.array([1.0, 1.0]), np.array([3.0]), np.array([2.0, 2.0, 2.0]), np.array([4.0])]
    weights = [np.array([2.0, 100.0]), np.array([100.0]), np.array([1.0, 1.0, 1.0]), np.array([1.0])]
    # By return the episodes go 2 < 0 < 1 < 3: the better half is {1, 3}, the worse {2, 0}. V's
    # means (1, 3, 2, 4) get 5 of the 6 pairs right, both of the better half's, neither of the worse's.
    text = plot.summary("ckpt.pt", values, weights, np.array([5.0, 9.0, 1.0, 10.0]))
    assert text.splitlines() == [
        "ckpt.pt: V ranks 83.3% of episode pairs right; mean V of the best episode 4.0, the median 3.0, the worst 2.0",
        "  better half: V ranks 100.0% of its pairs right, mean V 3.5; actor's weight on its steps: mean 50.50, "
        "50.0% at the cap of 100",
        "  worse half: V ranks 0.0% of its pairs right, mean V 1.5; actor's weight on its steps: mean 21.00, "
        "20.0% at the cap of 100"]


# --- checkpoint.py: devices, output files, checkpoints ----------------------------------------

def test_checkpoint_round_trip(trained):
    model, _, ckpt = checkpoint.load_checkpoint(trained)
    assert ckpt["step"] == 80 and ckpt["env_id"] == "HalfCheetah-v5" and ckpt["reward_scale"] == 1000.0
    assert ckpt["model_config"]["context_len"] == 5 and ckpt["train_args"]["batch_size"] == 16
    assert ckpt["state_mean"].shape == (S,) and "state" in ckpt["optimizer"]
    raw = torch.load(trained, weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, raw["model"][name])
    s, a, r, t = random_window(2, 5)
    fresh = DecisionTransformer(DTConfig(**ckpt["model_config"])).eval()
    fresh.load_state_dict(raw["model"])
    torch.testing.assert_close(model(s, a, r, t), fresh(s, a, r, t))
    assert not list(trained.parent.glob(".*partial*"))  # the atomic write left nothing behind


def test_an_output_folder_is_made_and_an_unwritable_one_is_refused_before_training(tmp_path, capsys):
    data = str(write_d4rl(tmp_path / "halfcheetah-o.hdf5", [50] * 4))
    out = tmp_path / "runs" / "exp1" / "ckpt.pt"
    train.main(["--data", data, "--max-steps", "2", *TINY, "--out", str(out)])
    assert out.exists() and out.with_suffix(".csv").exists() and not Path(f"{out}.lock").exists()
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder should be")
    bad = blocker / "ckpt.pt"
    proc = run_cli("train.py", "--data", data, "--max-steps", "2", *TINY, "--out", str(bad))
    assert_one_line_error(proc, str(bad), "cannot write", "--out")
    assert "data:" not in proc.stdout  # refused before the data was loaded


def test_a_finished_run_is_replaced_only_when_asked(tmp_path):
    data = str(write_d4rl(tmp_path / "halfcheetah-w.hdf5", [50] * 4))
    out = tmp_path / "run.pt"
    run = ["train.py", "--data", data, "--max-steps", "3", *TINY, "--out", str(out)]
    assert run_cli(*run).returncode == 0
    before = out.read_bytes()
    assert_one_line_error(run_cli(*run), str(out), "already holds a run (step 3)", "--overwrite", "--resume")
    assert out.read_bytes() == before and not Path(f"{out}.lock").exists()
    proc = run_cli(*run, "--overwrite", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() != before


def test_a_full_disk_during_a_save_ends_in_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    data = str(write_d4rl(tmp_path / "halfcheetah-d.hdf5", [50] * 4))
    out, real_save, saves = tmp_path / "full.pt", torch.save, []

    def save_then_run_out_of_space(obj, f):
        saves.append(obj["step"])
        if len(saves) == 2:  # what torch.save raises when the disk fills up mid-write
            Path(f).write_bytes(b"half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                               "file data/3: file write failed")
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", save_then_run_out_of_space)
    with pytest.raises(RunError) as err:
        train.main(["--data", data, "--max-steps", "20", "--save-every", "4", *TINY, "--out", str(out)])
    message = str(err.value)
    assert "\n" not in message and f"cannot write {out}" in message and "disk full" in message
    assert f"still holds step 4, resume from it with --resume {out}" in message
    monkeypatch.undo()
    assert torch.load(out, weights_only=True)["step"] == 4  # the previous save is whole
    assert not list(tmp_path.glob(".*partial*"))

class RunsCodeWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):  # unpickling would call open(path, "w"): a harmless stand-in for malware
        return open, (self.path, "w")


def test_a_checkpoint_cannot_run_code(tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": RunsCodeWhenUnpickled(marker)}, evil)
    assert_one_line_error(run_cli("evaluate.py", str(evil)), str(evil), "not a readable checkpoint")
    assert_one_line_error(run_cli("train.py", "--resume", str(evil)), str(evil), "not a readable checkpoint")
    assert not marker.exists()


def test_checkpoints_for_another_env_size_or_format_are_refused_in_one_line(tmp_path, trained):
    # A HalfCheetah checkpoint in Hopper; Walker2d has HalfCheetah's sizes, so the name must decide.
    assert_one_line_error(run_cli("evaluate.py", str(trained), "--env", "Hopper-v5"),
                          str(trained), "trained in HalfCheetah-v5, not Hopper-v5")
    walker = edited_checkpoint(trained, tmp_path / "walker.pt", env_id="Walker2d-v5")
    assert_one_line_error(run_cli("evaluate.py", walker, "--env", "HalfCheetah-v5"), walker, "Walker2d-v5")
    newer = edited_checkpoint(trained, tmp_path / "v2.pt", format_version=2)
    assert_one_line_error(run_cli("evaluate.py", newer), newer, "format version 2", "reads version 1")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, foreign)
    assert_one_line_error(run_cli("evaluate.py", str(foreign)), str(foreign), "not a checkpoint written by")
    weights = torch.load(trained, weights_only=True)["model"]
    weights.pop("predict_action.weight")
    damaged = edited_checkpoint(trained, tmp_path / "damaged.pt", model=weights)
    assert_one_line_error(run_cli("evaluate.py", damaged), damaged, "weights do not fit")
    # 11 observations but labelled HalfCheetah (17): refused by size before any rollout.
    data = write_d4rl(tmp_path / "halfcheetah-small.hdf5", [30, 30], state_dim=11)
    small = tmp_path / "small.pt"
    train.main(["--data", str(data), "--max-steps", "2", "--n-layer", "1", "--n-embd", "16",
                "--out", str(small)])
    assert_one_line_error(run_cli("evaluate.py", str(small), "--episodes", "1"), str(small),
                          "observations of size 17", "trained for 11")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_is_one_line_before_any_work(tmp_path, trained):
    missing = tmp_path / "not-loaded.hdf5"  # never read: the device is checked first
    assert_one_line_error(run_cli("train.py", "--device", "cuda", "--data", str(missing)), "--device cuda",
                          "--device cpu")
    assert_one_line_error(run_cli("evaluate.py", str(trained), "--device", "cuda"), "--device cuda")


# --- evaluate.py and rollout.py ---------------------------------------------------------------

def test_rollout_in_halfcheetah_reports_returns_and_normalized_score(trained, capsys):
    evaluate.main([str(trained), "--target", "3000", "6000", "--episodes", "2", "--json"])
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["target"] for r in results] == [3000, 6000]
    for r in results:
        assert r["env"] == "HalfCheetah-v5" and r["episodes"] == 2 and len(r["returns"]) == 2
        assert r["mean_return"] == pytest.approx(np.mean(r["returns"]), abs=0.01)
        assert r["normalized_score"] == pytest.approx(
            100 * (r["mean_return"] + 280.178953) / (12135.0 + 280.178953))


def untrained_hopper(tmp_path):
    """A tiny Hopper DT after one training step, and its normalization: its episodes end within a
    few dozen steps, each at its own time."""
    data = write_d4rl(tmp_path / "hopper-x.hdf5", [30, 30], state_dim=11, act_dim=3)
    out = tmp_path / "hopper.pt"
    train.main(["--data", str(data), "--max-steps", "1", *TINY, "--out", str(out)])
    model, norm, _ = checkpoint.load_checkpoint(out)
    return model, norm


def test_finished_episodes_stop_counting_while_the_others_run_on(tmp_path):
    """An untrained Hopper falls within a few dozen steps, each episode at its own time: returns
    from the batched rollout must equal those of each episode run alone."""
    model, norm = untrained_hopper(tmp_path)
    together = rollout.rollout(model, norm, "Hopper-v5", 3600, 4, seed=0, progress=False)
    alone = [rollout.rollout(model, norm, "Hopper-v5", 3600, 1, seed=i, progress=False)[0] for i in range(4)]
    np.testing.assert_allclose(together, alone, rtol=1e-4)
    assert len(set(np.round(together, 3))) == 4


def test_the_policy_sees_the_same_shapes_at_every_step(tmp_path, monkeypatch):
    """rollout hands get_action a K-step window every time, padded and masked at the start: the
    fixed shapes that let torch.compile capture one step's forward once and replay it."""
    model, norm = untrained_hopper(tmp_path)
    calls, get_action = [], model.get_action
    # The window's buffers are updated in place, so each call's inputs are copied as they were.
    monkeypatch.setattr(model, "get_action", lambda *a: (calls.append([x if x is None else x.clone() for x in a]),
                                                         get_action(*a))[1])
    rollout.rollout(model, norm, "Hopper-v5", 3600, 3, seed=0, progress=False)
    K = model.cfg.context_len
    assert len(calls) > K  # the episodes outlive the padded start
    assert {tuple(x.shape for x in c[:4]) for c in calls} == {((3, K, 11), (3, K, 3), (3, K, 1), (3, K))}
    for t, (*_, timesteps, mask) in enumerate(calls):
        assert timesteps[0, -1] == t
        if t < K - 1:  # the first K - 1 steps: t + 1 real steps on the right
            assert mask.sum(1).tolist() == [t + 1] * 3 and mask[:, -1].all()
        else:
            assert mask is None


@needs_compiler
def test_a_compiled_rollout_acts_as_the_eager_one(tmp_path):
    """torch.compile of the policy (the default on CUDA) gives the same episodes, and the fixed
    shapes keep it to two graphs: the padded start, with its mask, and every step after it.
    (Hopper: an untrained one falls within a few dozen steps, before rounding differences between
    compiled and eager kernels can grow, as they do over a 1000-step HalfCheetah episode.)"""
    model, norm = untrained_hopper(tmp_path)
    torch._dynamo.reset()
    eager = rollout.rollout(model, norm, "Hopper-v5", 3600, 3, progress=False, compile=False)
    torch._dynamo.utils.counters.clear()
    compiled = rollout.rollout(model, norm, "Hopper-v5", 3600, 3, progress=False, compile=True)
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_sharded_envs_step_exactly_as_one_process():
    """vecenv.ShardedVectorEnv: 5 Hoppers over 2 worker processes give the same observations,
    rewards and ends, autoresets included, as one gymnasium vector env in this process."""
    actions = np.random.default_rng(0).uniform(-1, 1, (60, 5, 3)).astype(np.float32)
    runs = []
    for workers in (1, 2):
        envs = vecenv.make_envs("Hopper-v5", 5, workers=workers)
        steps = [envs.reset(seed=7)[0]] + [envs.step(a)[:4] for a in actions]
        envs.close()
        runs.append(steps)
    one, sharded = runs
    np.testing.assert_array_equal(one[0], sharded[0])
    for a, b in zip(one[1:], sharded[1:]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert any(step[2].any() for step in one[1:])  # some fell, and were reset, within the 60 steps


def test_a_rollout_with_env_workers_returns_what_one_process_does(tmp_path):
    model, norm = untrained_hopper(tmp_path)
    alone = rollout.rollout(model, norm, "Hopper-v5", 3600, 3, seed=0, progress=False)
    sharded = rollout.rollout(model, norm, "Hopper-v5", 3600, 3, seed=0, progress=False, env_workers=2)
    np.testing.assert_array_equal(alone, sharded)


def test_env_workers_fail_in_one_line(trained, tmp_path, capsys):
    with pytest.raises(checkpoint.RunError, match="cannot make environment 'Nope-v5'"):
        vecenv.make_envs("Nope-v5", 4, workers=2)
    with pytest.raises(SystemExit):
        evaluate.parse_args([str(trained), "--video", str(tmp_path / "x.gif"), "--env-workers", "2"])
    assert "leave out --env-workers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args([str(trained), "--env-workers", "0"])
    assert "--env-workers must be at least 1" in capsys.readouterr().err


def test_ctrl_c_during_an_evaluation_with_env_workers_ends_in_one_line(trained, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group, the workers too: only evaluate.py
    answers it, in one line, and no worker is left behind."""
    err = tmp_path / "stderr"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "evaluate.py", str(trained), "--episodes", "100", "--env-workers", "2"],
                                cwd=HERE, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 90
    while "target" not in err.read_text():  # the progress bar: the workers are stepping
        assert proc.poll() is None and time.time() < deadline, err.read_text()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 1
    lines = [line for line in err.read_text().replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1] == "interrupted" and "Traceback" not in err.read_text(), lines[-10:]
    deadline = time.time() + 10
    while group_alive(proc.pid):  # the workers, and multiprocessing's helper, go with it
        assert time.time() < deadline, subprocess.run(["ps", "-g", str(proc.pid), "-o", "pid,args"],
                                                      capture_output=True, text=True).stdout
        time.sleep(0.1)


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_normalized_score_reference_points():
    assert rollout.normalized_score("HalfCheetah-v5", 12135.0) == pytest.approx(100.0)
    assert rollout.normalized_score("HalfCheetah-v5", -280.178953) == pytest.approx(0.0)
    assert rollout.normalized_score("Hopper-v5", 3234.3) == pytest.approx(100.0)


def test_a_target_sweep_prints_a_table_and_draws_it(trained, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sweep.png"
    evaluate.main([str(trained), "--target", "0", "3000", "6000", "--episodes", "2", "--plot", str(png)])
    out = capsys.readouterr().out
    table = out[out.index("achieved (mean ± std)"):].splitlines()[1:4]
    assert [line.split()[0] for line in table] == ["0", "3000", "6000"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_cli_errors_are_one_line(tmp_path, trained):
    missing = tmp_path / "nope.hdf5"
    assert_one_line_error(run_cli("train.py", "--data", str(missing)), str(missing), "no such file")
    junk = tmp_path / "junk.hdf5"
    junk.write_bytes(b"\x00garbage" * 100)
    assert_one_line_error(run_cli("train.py", "--data", str(junk)), str(junk), "HDF5")
    foreign = tmp_path / "foreign.hdf5"
    with h5py.File(foreign, "w") as f:
        f["pixels"] = np.zeros((4, 3))
    assert_one_line_error(run_cli("train.py", "--data", str(foreign)), str(foreign), "observations")
    proc = run_cli("evaluate.py", str(junk))
    assert_one_line_error(proc, str(junk), "not a readable checkpoint")
    assert "Error)" not in proc.stderr  # what went wrong, not the name of a Python exception
    assert_one_line_error(run_cli("evaluate.py", str(tmp_path / "none.pt")), "no such file")
    proc = run_cli("evaluate.py", str(trained), "--episodes", "1")
    assert proc.returncode == 0 and "(1 episode)" in proc.stdout, proc.stderr


# --- video.py and plot.py ---------------------------------------------------------------------

def test_video_renders_the_first_episode_without_changing_its_return(trained, tmp_path, capsys, monkeypatch):
    backend = video.offscreen_gl_backend()
    if backend is None:
        pytest.skip("no off-screen OpenGL here (neither EGL nor OSMesa works)")
    monkeypatch.setenv("MUJOCO_GL", backend)
    gif = tmp_path / "cheetah.gif"
    evaluate.main([str(trained), "--target", "3000", "--episodes", "2", "--video", str(gif),
                   "--video-seconds", "0.25"])
    out = capsys.readouterr().out
    first_return = out.split("returns:")[1].split()[0]
    assert f"video: {gif} (episode 0, target 3000: return {first_return})" in out
    from PIL import Image
    with Image.open(gif) as image:  # 0.25 s at HalfCheetah's 20 steps/s, plus the reset frame
        assert image.format == "GIF" and image.size == video.SIZE and image.n_frames == 6
        image.seek(5)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 5  # a picture, not a blank frame
    # Widening the floor for the camera must not change the physics.
    evaluate.main([str(trained), "--target", "3000", "--episodes", "2", "--json"])
    assert json.loads(capsys.readouterr().out)["returns"][0] == pytest.approx(float(first_return), abs=0.06)


def test_video_arguments_are_checked_before_any_rollout(trained, tmp_path, capsys, monkeypatch):
    def error_of(*args):
        with pytest.raises(SystemExit) as exit_:
            evaluate.parse_args([str(trained), *args])
        assert exit_.value.code == 2
        return capsys.readouterr().err

    assert "must end in .mp4 or .gif" in error_of("--video", str(tmp_path / "x.avi"))
    assert "no such directory" in error_of("--video", str(tmp_path / "missing" / "x.gif"))
    assert "must be positive" in error_of("--video", str(tmp_path / "x.gif"), "--video-seconds", "0")
    monkeypatch.setattr(video, "offscreen_gl_backend", lambda: None)
    assert "apt install libegl1 or libosmesa6" in error_of("--video", str(tmp_path / "x.gif"))
    monkeypatch.setattr(video, "offscreen_gl_backend", lambda: "egl")
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if it were not installed
    monkeypatch.setenv("MUJOCO_GL", "egl")  # parse_args sets it; monkeypatch puts it back
    args = evaluate.parse_args([str(trained), "--video", str(tmp_path / "x.mp4")])
    assert args.video == tmp_path / "x.gif" and "pip install imageio-ffmpeg" in capsys.readouterr().err


def test_training_log_is_drawn_as_a_png_beside_it(trained, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    log = tmp_path / "run.csv"
    rows = trained.with_suffix(".csv").read_text().splitlines()
    rows[4] = rows[4].rstrip(",") + ",1234.5,12.1"  # an evaluation row, as --eval-every writes
    log.write_text("\n".join(rows) + "\n")
    plot.main([str(log)])
    assert capsys.readouterr().out.strip() == f"plot: {tmp_path / 'run.png'}"
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.read_log(log)["eval_score"][3] == 12.1
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    with pytest.raises(RunError, match="not a training log"):
        plot.main([str(tmp_path / "notes.csv")])
    with pytest.raises(RunError, match="no such file"):
        plot.main([str(tmp_path / "missing.csv")])


def test_plot_without_matplotlib_says_how_to_get_it(trained, tmp_path, capsys, monkeypatch):
    png = tmp_path / "sweep.png"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit) as exit_:
        evaluate.parse_args([str(trained), "--plot", str(png)])
    assert exit_.value.code == 2 and "pip install matplotlib" in capsys.readouterr().err


# --- distributed.py, bench.py and experiment.py ------------------------------------------------

@pytest.mark.parametrize("model", ["dt", "iql"])
def test_torchrun_trains_data_parallel_on_two_cpu_processes(tmp_path, model):
    data = write_d4rl(tmp_path / "halfcheetah-ddp.hdf5", [50] * 4)
    # Both cover an epoch (200 steps) in half the steps with two processes: the DT in windows of
    # 4 x batch 8, IQL in transitions, batch 16.
    size, steps, weight = {"dt": (TINY, (14, 8), "predict_action.weight"),
                           "iql": (["--model", "iql", "--batch-size", "16", "--n-embd", "16"], (26, 14), "q1.0.weight")}[model]
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}.pt"
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        proc = subprocess.run([*(launch if world == 2 else [sys.executable]), "train.py", "--data", str(data),
                               "--epochs", "2", "--log-every", "2", *size, "--out", str(out)],
                              cwd=HERE, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        runs[world] = proc.stdout, torch.load(out, weights_only=True)
    assert f"{steps[0]} steps ({steps[0] // 2} per epoch)" in runs[1][0]
    assert f"{steps[1]} steps ({steps[1] // 2} per epoch)" in runs[2][0]
    stdout, ckpt = runs[2]
    assert stdout.count("config:") == 1 and "2 processes" in stdout  # only process 0 speaks
    assert ckpt["step"] == steps[1] and len((tmp_path / "world2.csv").read_text().splitlines()) == 1 + steps[1] // 2
    # Process 1's batches (another seed) reached the weights through the averaged gradients.
    assert not torch.equal(ckpt["model"][weight], runs[1][1]["model"][weight])


def test_bench_runs_and_reports_every_figure(capsys):
    result = bench.main(["--synthetic", "--steps", "2", "--warmup", "1", "--eval-episodes", "1", "2",
                         "--n-layer", "1", "--n-embd", "32", "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    for key in ("train_samples_per_s", "train_steps_per_s", "sampler_ms_per_batch", "eval_env_steps_per_s",
                "eval_env_steps_per_s_sequential", "peak_mem_mb", "peak_gflops", "train_flop_fraction",
                "eval_flop_fraction"):
        assert result[key] > 0, key
    assert result["train_flop_fraction"] < 1 and result["eval_flop_fraction"] < 1  # nothing beats the peak
    # Twice the episodes, twice the forward's FLOPs: the count is of the real model, per episode.
    flops = result["eval_forward_gflop_by_episodes"]
    assert flops[2] == pytest.approx(2 * flops[1], rel=1e-6)
    assert result["device"].startswith("cpu") and set(result["eval_env_steps_per_s_by_episodes"]) == {1, 2}


@needs_compiler
def test_the_compiled_path_check_reports_each_mode_against_eager(capsys):
    result = bench.main(["--synthetic", "--check", "--steps", "4", "--warmup", "1", "--eval-episodes", "2",
                         "--compile-modes", "default", "--env-workers", "2", *TINY])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert result["eager"]["steps_per_s"] > 0 and result["default"]["steps_per_s"] > 0
    assert result["max_loss_gap"] < 0.05  # the same batches and seed: compiled training learns the same
    assert result["env_workers"] == 2  # the rollouts step their environments in 2 processes
    for curve in ("eval_env_steps_per_s_by_episodes", "eval_compiled_env_steps_per_s_by_episodes",
                  "env_only_steps_per_s_by_episodes", "env_only_steps_per_s_by_episodes_workers"):
        assert set(result[curve]) == {2} and result[curve][2] > 0


def test_the_experiment_plan_and_its_results_table(tmp_path, monkeypatch, capsys):
    names = [name for name, *_ in experiment.plan()]
    assert len(names) == len(set(names))
    for body in experiment.FILES:
        for method, seeds in (("dt-dense", 3), ("iql-dense", 3), ("dt-delayed", 2), ("iql-delayed", 2),
                              ("bc-dense", 3), ("bc10-dense", 3), ("bc-delayed", 0), ("bc10-delayed", 0)):
            assert sum(n.startswith(f"{body}-{method}-s") for n in names) == seeds, (body, method)
    monkeypatch.setattr(experiment, "RESULTS", tmp_path)
    (tmp_path / "runs").mkdir()
    for seed, score in ((0, 90.0), (1, 80.0)):
        row = dict(method="dt", dataset=experiment.FILES["hopper"], reward_mode="dense", seed=seed, steps=10,
                   train_s=1.0, target=3600.0, episodes=10, mean_return=1.0, std_return=0.0, normalized_score=score)
        (tmp_path / "runs" / f"hopper-dt-dense-s{seed}.json").write_text(json.dumps(row))
    experiment.main(["--table"])
    assert "| dt | dense | not run yet | 85.0 ± 5.0 (90.0, 80.0) | not run yet |" in capsys.readouterr().out
    with open(tmp_path / "medium-expert.csv") as f:
        assert [r["seed"] for r in csv.DictReader(f)] == ["0", "1"]
    if importlib.util.find_spec("matplotlib"):  # the learning curves, from the runs' training logs
        (tmp_path / "runs" / "hopper-dt-dense-s0.csv").write_text(
            "step,loss,lr,elapsed_s,eval_return,eval_score\n100,0.5,1e-4,10.0,,\n200,0.4,1e-4,20.0,3000.0,90.0\n")
        experiment.main(["--curves", str(tmp_path / "curves.png")])
        assert capsys.readouterr().out.strip() == f"experiment: {tmp_path / 'curves.png'}"
        assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_experiment_run_stopped_part_way_is_not_scored(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "HERE", tmp_path)
    monkeypatch.setattr(experiment, "RESULTS", tmp_path / "results")

    def train_stopped_by_sigterm(cmd, **kwargs):  # train.py saved step 40 of 100 and exited cleanly
        torch.save({"step": 40, "total_steps": 100, "elapsed_s": 1.0}, tmp_path / "runs" / "hopper-dt-dense-s0.pt")

    monkeypatch.setattr(experiment.subprocess, "run", train_stopped_by_sigterm)
    with pytest.raises(SystemExit, match="stopped at step 40 of 100; the same command carries on from there"):
        experiment.run("hopper-dt-dense-s0", "hopper", "dt", "dense", 0, str(tmp_path))
    assert not (tmp_path / "results" / "runs" / "hopper-dt-dense-s0.json").exists()


# --- download.py ------------------------------------------------------------------------------

class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.body with HTTP Range support, misbehaving as server.plan says: one entry per
    request, the last repeating. "ok"; "drop": half the bytes, then close; "stall": half, then
    silence; "long"/"short": announce 1000 bytes more/less than the file has ("long" ignores
    Range); "no-range": ignore Range; "busy": 503; "missing": 404."""

    def do_GET(self):
        srv = self.server
        how = srv.plan[min(len(srv.ranges), len(srv.plan) - 1)]
        srv.ranges.append(self.headers.get("Range"))
        if how in ("busy", "missing"):
            return self.send_error(503 if how == "busy" else 404)
        body, start = srv.body, 0
        if self.headers.get("Range") and how not in ("no-range", "long"):
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        announced = len(payload) + {"long": 1000, "short": -1000}.get(how, 0)
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        if how in ("drop", "stall"):
            self.wfile.write(payload[:len(payload) // 2])
            self.wfile.flush()
            if how == "stall":
                time.sleep(1.5)
            return
        self.wfile.write(payload[:announced])

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server(tmp_path):
    """A local server for one file; set .body and .plan, read .ranges (the Range header of each
    request) and .url."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    server.body = write_d4rl(tmp_path / "source.hdf5", [300] * 4).read_bytes()
    server.plan, server.ranges = ["ok"], []
    server.url = f"http://127.0.0.1:{server.server_address[1]}/halfcheetah_expert-v2.hdf5"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def fetch(server, dest, **kw):
    return download.download("halfcheetah-expert-v2", dest, url=server.url, backoff=0, timeout=0.5, **kw)


@pytest.mark.parametrize("plan, asks_resume", [
    (["ok"], False),
    (["drop", "ok"], True),          # resumes from the byte where the connection dropped
    (["stall", "ok"], True),         # a dead connection times out, then resumes
    (["busy", "drop", "ok"], True),  # 503 is retried
    (["drop", "no-range"], True),    # a server that ignores Range: start over, still correct
])
def test_download_survives_a_bad_connection_and_verifies(tmp_path, flaky_server, plan, asks_resume):
    flaky_server.plan = plan
    dest = tmp_path / "data" / "halfcheetah-expert-v2.hdf5"
    fetch(flaky_server, dest)
    assert dest.read_bytes() == flaky_server.body
    assert len(flaky_server.ranges) == len(plan)
    assert (flaky_server.ranges[-1] == f"bytes={len(flaky_server.body) // 2}-") == asks_resume
    recorded = (tmp_path / "data" / "halfcheetah-expert-v2.hdf5.sha256").read_text()
    assert recorded == f"{hashlib.sha256(flaky_server.body).hexdigest()}  {dest.name}\n"
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name, dest.name + ".sha256"]
    load_trajectories(dest)


@pytest.mark.parametrize("plan, body, problem", [
    (["long"], None, "connection ended after"),  # announces more than it ever sends
    (["short"], None, "not a usable D4RL dataset"),  # complete by its own header, but truncated
    (["ok"], b"<html>Please log in to the hotel wifi</html>", "not a usable D4RL dataset"),
    (["missing"], None, "server answered 404"),
])
def test_download_never_leaves_a_bad_file_under_the_final_name(tmp_path, flaky_server, plan, body, problem):
    flaky_server.plan = plan
    flaky_server.body = body or flaky_server.body
    dest = tmp_path / "data" / "halfcheetah-expert-v2.hdf5"
    with pytest.raises(download.DownloadError, match=problem) as err:
        fetch(flaky_server, dest, retries=2)
    assert "\n" not in str(err.value) and flaky_server.url in str(err.value)
    if plan == ["long"]:  # the bytes it did send are kept for a later resume, and it says so
        assert "run again to resume" in str(err.value) and len(flaky_server.ranges) == 3
        assert [p.name for p in dest.parent.iterdir()] == [dest.name + ".part"]
    else:
        assert not dest.parent.exists()  # not even the data/ folder it made


def test_interrupted_download_resumes_on_the_next_run(tmp_path, flaky_server):
    flaky_server.plan = ["drop"]
    dest = tmp_path / "data" / "halfcheetah-expert-v2.hdf5"
    with pytest.raises(download.DownloadError, match="kept in"):
        fetch(flaky_server, dest, retries=0)
    flaky_server.plan, flaky_server.ranges = ["ok"], []
    fetch(flaky_server, dest)
    assert flaky_server.ranges == [f"bytes={len(flaky_server.body) // 2}-"]
    assert dest.read_bytes() == flaky_server.body


def test_a_changed_file_fails_its_recorded_checksum(tmp_path, flaky_server):
    dest = tmp_path / "data" / "halfcheetah-expert-v2.hdf5"
    fetch(flaky_server, dest)
    fetch(flaky_server, dest)  # present and intact: verified, not fetched again
    assert len(flaky_server.ranges) == 1
    with h5py.File(dest, "a") as f:
        f["rewards"][0] += 1.0
    with pytest.raises(download.DownloadError, match="SHA-256 no longer matches"):
        fetch(flaky_server, dest)
    proc = run_cli("train.py", "--data", str(dest), "--max-steps", "1")
    assert_one_line_error(proc, str(dest), "SHA-256")


def test_unreachable_host_says_offline_and_names_data_flag(tmp_path):
    dest = tmp_path / "data" / "x.hdf5"
    with pytest.raises(download.DownloadError, match="Offline.*--data"):
        download.download("halfcheetah-expert-v2", dest, url="http://127.0.0.1:9/x.hdf5", retries=1,
                          backoff=0)
    assert not dest.parent.exists()


def test_download_names_every_dataset_and_lists_their_sizes(flaky_server, monkeypatch, capsys):
    proc = run_cli("download.py", "--help")
    assert proc.returncode == 0
    for name in download.DATASETS:
        body, quality = name.removesuffix("-v2").split("-", 1)
        assert f"{{{','.join(download.BODIES)}}}" in proc.stdout and quality in proc.stdout
    monkeypatch.setattr(download, "DATASETS", {"halfcheetah-expert-v2": flaky_server.url,
                                               "hopper-expert-v2": "http://127.0.0.1:9/none.hdf5"})
    download.main(["--list"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "halfcheetah-expert-v2" and f"{len(flaky_server.body) / 1e6:,.0f} MB" in lines[0]
    assert lines[1].split()[0] == "hopper-expert-v2" and "size unknown" in lines[1]


def test_dataset_addresses_follow_d4rl_naming():
    assert len(download.DATASETS) == 18
    assert download.DATASETS["walker2d-full-replay-v2"].endswith("/gym_mujoco_v2/walker2d_full_replay-v2.hdf5")
    assert download.DATASETS["halfcheetah-medium-replay-v2"].endswith(
        "/gym_mujoco_v2/halfcheetah_medium_replay-v2.hdf5")


