"""Tests: CPU only, no network, small synthetic data made under pytest's tmp_path."""
import csv
import functools
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import download
import evaluate
import train
from data import DataError, episode_ends, load_trajectories, returns_to_go, sample_batch
from model import DecisionTransformer, DTConfig

HERE = Path(__file__).parent
S, A = 17, 6  # HalfCheetah's sizes, so synthetic checkpoints can be rolled out in HalfCheetah-v5


def write_d4rl(path, lengths, timeout_last=True, seed=0, extra_keys=True):
    """Episodes back to back in D4RL's flat layout. Actions are a fixed function of the state, so
    a model can learn them; episodes end on terminals (odd ones) or timeouts (even ones)."""
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    obs = rng.normal(size=(n, S)).astype(np.float32)
    actions = np.tanh(obs[:, :A] * 0.8 - obs[:, A:2 * A] * 0.5).astype(np.float32)
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


def tiny_model(K=8, dropout=0.0):
    torch.manual_seed(0)
    return DecisionTransformer(DTConfig(state_dim=S, act_dim=A, context_len=K, n_layer=2, n_head=2,
                                        n_embd=32, dropout=dropout)).eval()


def random_window(B, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, K, S, generator=g), torch.rand(B, K, A, generator=g) * 2 - 1,
            torch.randn(B, K, 1, generator=g), torch.randint(0, 1000, (B, K), generator=g))


# --- model -----------------------------------------------------------------------------------------

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


def test_weight_decay_only_on_matrices():
    opt = train.configure_optimizer(tiny_model(), 1e-3, 0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])


# --- data ------------------------------------------------------------------------------------------

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


# --- training, checkpoints, evaluation -------------------------------------------------------------

def test_lr_schedule_warms_up_then_decays():
    lrs = [train.get_lr(s, 100, 1e-3) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_a_few_training_steps_lower_the_loss(trained):
    with open(trained.with_suffix(".csv")) as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 8
    assert losses[-1] < 0.6 * losses[0]


def test_checkpoint_round_trip(trained):
    model, ckpt = evaluate.load_checkpoint(trained)
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
    assert not Path(str(trained) + ".tmp").exists()


def test_rollout_in_halfcheetah_reports_returns_and_normalized_score(trained, capsys):
    evaluate.main([str(trained), "--target", "3000", "6000", "--episodes", "2", "--json"])
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["target"] for r in results] == [3000, 6000]
    for r in results:
        assert r["env"] == "HalfCheetah-v5" and r["episodes"] == 2 and len(r["returns"]) == 2
        assert r["mean_return"] == pytest.approx(np.mean(r["returns"]), abs=0.01)
        assert r["normalized_score"] == pytest.approx(
            100 * (r["mean_return"] + 280.178953) / (12135.0 + 280.178953))


def test_normalized_score_reference_points():
    assert evaluate.normalized_score("HalfCheetah-v5", 12135.0) == pytest.approx(100.0)
    assert evaluate.normalized_score("HalfCheetah-v5", -280.178953) == pytest.approx(0.0)
    assert evaluate.normalized_score("Hopper-v5", 3234.3) == pytest.approx(100.0)


def run_cli(*args):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc, *words):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(w in last for w in words), proc.stderr


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
    assert_one_line_error(run_cli("evaluate.py", str(junk)), str(junk), "not a readable checkpoint")
    assert_one_line_error(run_cli("evaluate.py", str(tmp_path / "none.pt")), "no such file")
    # A HalfCheetah checkpoint (17 observations) in Hopper (11): refused before any rollout.
    assert_one_line_error(run_cli("evaluate.py", str(trained), "--env", "Hopper-v5", "--episodes", "1"),
                          str(trained), "Hopper-v5", "size 11", "17")


# --- download --------------------------------------------------------------------------------------

@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 on a free port, in a thread."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_from_a_local_server(tmp_path, http_server):
    root, url = http_server
    source = write_d4rl(root / "halfcheetah_expert-v2.hdf5", [20, 20])
    dest = tmp_path / "data" / "halfcheetah-expert-v2.hdf5"
    download.download("halfcheetah-expert-v2", dest, url=f"{url}/halfcheetah_expert-v2.hdf5")
    assert dest.read_bytes() == source.read_bytes()
    assert not Path(str(dest) + ".part").exists()
    load_trajectories(dest)


def test_download_failure_leaves_no_file_and_says_why(tmp_path, http_server):
    _, url = http_server
    dest = tmp_path / "data" / "x.hdf5"
    with pytest.raises(download.DownloadError, match="--data"):
        download.download("halfcheetah-expert-v2", dest, url=f"{url}/missing.hdf5")
    assert list(dest.parent.iterdir()) == []


def test_dataset_addresses_follow_d4rl_naming():
    assert len(download.DATASETS) == 15
    assert download.DATASETS["halfcheetah-medium-replay-v2"].endswith(
        "/gym_mujoco_v2/halfcheetah_medium_replay-v2.hdf5")
