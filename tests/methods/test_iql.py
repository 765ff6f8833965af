"""Tests of iql.py."""
import importlib.util
import json

import h5py
import numpy as np
import pytest
import torch

import evaluate
import train
from common.checkpoint import RunError
from data import load_trajectories
from methods import iql
from model import DTConfig
from study import plot
from tests.helpers import A, S, assert_usage_error, run_cli, write_d4rl


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
    data, _ = load_trajectories(path)
    iql.prepare(data, "dense")
    t = data.transitions
    raw = lambda x: x * data.norm.state_std + data.norm.state_mean  # noqa: E731
    starts, ends = [0, 4, 7], [3, 6, 11]
    totals = [rewards[s:e + 1].sum() for s, e in zip(starts, ends)]
    scale = 1000 / (max(totals) - min(totals))  # the IQL paper's reward scaling for locomotion
    torch.testing.assert_close(t.rewards, torch.tensor(rewards * scale, dtype=torch.float32))
    assert t.terminals.tolist() == [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]  # only the fall ends the MDP
    inside = [i for i in range(12) if i not in ends]
    torch.testing.assert_close(t.next_states[inside], data.states[[i + 1 for i in inside]])
    for e in (3, 11):  # cut by the time limit: bootstrapped, from the file's s' or the step's own state
        expected = obs[e] + 100.0 if with_next_observations else obs[e]
        torch.testing.assert_close(raw(t.next_states[e]), torch.tensor(expected), rtol=0, atol=1e-4)

    delayed, _ = load_trajectories(path, reward_mode="delayed")
    iql.prepare(delayed, "delayed")
    assert delayed.transitions.terminals.tolist() == [1.0 if i in ends else 0.0 for i in range(12)]  # paid, then over
    expected = np.zeros(12)
    expected[ends] = np.array(totals) * scale  # every episode's whole return on its last step
    torch.testing.assert_close(delayed.transitions.rewards, torch.tensor(expected, dtype=torch.float32))


def test_the_td_target_does_not_bootstrap_past_a_termination():
    torch.manual_seed(0)
    model = iql.IQL(DTConfig(kind="iql", state_dim=S, act_dim=A, n_layer=2, n_embd=32))
    cfg = iql.IQLConfig()
    s, a = torch.randn(2, S), torch.rand(2, A) * 2 - 1
    r, s_next = torch.tensor([1.0, 1.0]), torch.randn(2, S)
    for terminal, changes in (([1.0, 1.0], False), ([0.0, 1.0], True)):
        batch = (s, a, r, s_next, torch.tensor(terminal))
        moved = s_next.clone()
        moved[0] += 3.0  # a different s' for transition 0 only
        before = iql.iql_loss(model, batch, cfg)
        after = iql.iql_loss(model, (s, a, r, moved, torch.tensor(terminal)), cfg)
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
    assert len(results) == 1 and results[0]["model"] == "iql" and "--target ignored" in captured.err
    assert results[0]["policy"] == "the state alone" and results[0]["target"] is None  # never handed one
    assert_usage_error(run_cli("train.py", "--data", str(data), "--expectile", "0.9"), "for --model reinformer or iql only")
    if importlib.util.find_spec("matplotlib"):  # V(s_t) along the data's episodes, as the README draws it
        with pytest.raises(RunError, match="asked for none"):  # but no sweep plot: it needs targets
            evaluate.main([str(out), "--plot", str(tmp_path / "sweep.png")])
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
