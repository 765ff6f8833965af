"""Tests of data.py."""
import h5py
import numpy as np
import pytest
import torch

from data import delay_rewards, episode_ends, load_trajectories
from tests.helpers import S, write_d4rl


def test_episodes_split_on_terminals_and_timeouts_and_keep_a_partial_tail(tmp_path):
    lengths = [7, 5, 9, 4]
    path = write_d4rl(tmp_path / "halfcheetah-x.hdf5", lengths, timeout_last=False)
    data, task = load_trajectories(path)
    assert task.env_id == "HalfCheetah-v5"
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    assert data.episode_start.tolist() == np.repeat(starts, lengths).tolist()
    assert data.timesteps.tolist() == [i for n in lengths for i in range(n)]
    with h5py.File(path) as f:
        rewards = f["rewards"][()]
    np.testing.assert_allclose(data.episode_returns, [rewards[s:s + n].sum() for s, n in zip(starts, lengths)],
                               rtol=1e-6)


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
