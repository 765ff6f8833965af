"""Tests of methods/qdt.py: returns-to-go relabelled with a learned value."""
import numpy as np
import pytest
import torch

import train
from common.checkpoint import CheckpointError
from data import load_trajectories
from methods import qdt
from tests.helpers import TINY, assert_one_line_error, assert_usage_error, run_cli, write_d4rl


def test_relabelling_takes_the_value_wherever_it_promises_more_and_carries_it_back():
    # One episode of rewards 1, 0, 0, 2: its own returns-to-go are 3, 2, 2, 2. A value of 10 at
    # its second step (another episode showed that much from there) lifts that step to 10 and the
    # step before it to 1 + 10; a value below the episode's own return changes nothing. The next
    # episode starts afresh.
    rewards = [1, 0, 0, 2, 5, 5]
    ends = [0, 0, 0, 1, 0, 1]
    values = [0, 10, 1, 0, 0, 0]
    assert qdt.relabelled_returns_to_go(rewards, ends, values).tolist() == [11, 10, 2, 2, 10, 5]


@pytest.fixture
def iql_run(tmp_path):
    """An IQL checkpoint on a small file whose V is a known constant: 400 in the file's reward units."""
    path = write_d4rl(tmp_path / "halfcheetah-q.hdf5", [20, 20])
    ckpt = tmp_path / "iql.pt"
    train.main(["--data", str(path), "--model", "iql", "--max-steps", "1", "--batch-size", "8", "--n-embd", "16",
                "--out", str(ckpt)])
    saved = torch.load(ckpt, weights_only=True)
    last = max(k for k in saved["model"] if k.startswith("v.") and k.endswith(".weight"))
    data, _ = load_trajectories(path)
    scale = 1000 / np.ptp(data.episode_returns)  # IQL's reward scale: V is in IQL's units
    saved["model"][last] = torch.zeros_like(saved["model"][last])
    saved["model"][last.replace("weight", "bias")] = torch.tensor([400.0 * scale])
    torch.save(saved, ckpt)
    return path, ckpt


def test_relabel_puts_the_iql_checkpoints_value_into_the_returns_to_go(iql_run):
    path, ckpt = iql_run
    data, _ = load_trajectories(path)
    own = data.returns_to_go * data.norm.reward_scale
    qdt.relabel(data, ckpt, "dense")
    rewards = data.rewards.double().numpy()
    want = np.zeros(40)
    for first in (0, 20):  # backwards through each episode: max(V = 400, r + the next label)
        running = 0.0
        for i in range(first + 19, first - 1, -1):
            running = max(400.0, rewards[i] + running)
            want[i] = running
    torch.testing.assert_close(data.returns_to_go * 1000, torch.tensor(want, dtype=torch.float32), rtol=1e-5, atol=1e-2)
    assert (data.returns_to_go * 1000 >= own - 1e-3).all()  # never below the episode's own


def test_a_checkpoint_from_other_data_or_rewards_or_another_model_is_refused(iql_run, tmp_path):
    path, ckpt = iql_run
    other = write_d4rl(tmp_path / "halfcheetah-o.hdf5", [20, 20], seed=1)
    data, _ = load_trajectories(other)
    with pytest.raises(CheckpointError, match="trained on other data"):
        qdt.relabel(data, ckpt, "dense")
    data, _ = load_trajectories(path, reward_mode="delayed")
    with pytest.raises(CheckpointError, match="trained on dense rewards, this run is on delayed"):
        qdt.relabel(data, ckpt, "delayed")
    dt = tmp_path / "dt.pt"
    train.main(["--data", str(path), "--max-steps", "1", *TINY, "--out", str(dt)])
    assert_one_line_error(run_cli("train.py", "--data", str(path), "--relabel-returns", str(dt), "--max-steps", "1"),
                          "a DT checkpoint; the relabelling needs IQL's value")
    assert_one_line_error(run_cli("train.py", "--data", str(other), "--relabel-returns", str(ckpt), "--max-steps", "1"),
                          "its IQL was trained on other data")
    assert_usage_error(run_cli("train.py", "--data", str(path), "--relabel-returns", str(ckpt), "--gamma", "0.9"),
                       "leave --gamma at 1")


def test_a_relabelled_run_trains_on_the_relabelled_returns(iql_run, tmp_path, capsys):
    path, ckpt = iql_run
    out = tmp_path / "qdt.pt"
    train.main(["--data", str(path), "--relabel-returns", str(ckpt), "--max-steps", "2", *TINY, "--out", str(out)])
    assert f"returns-to-go relabelled with the V of {ckpt} (QDT)" in capsys.readouterr().out
    assert torch.load(out, weights_only=True)["train_args"]["relabel_returns"] == str(ckpt)
