"""Tests of methods/reinformer.py: the max-return DT's loss, its token order, and its runs."""
import json

import numpy as np
import pytest
import torch

import evaluate
import train
from data import Normalization
from methods import reinformer
from model import DTConfig
from tests.helpers import A, S, TINY, assert_usage_error, random_window, run_cli, write_d4rl


def tiny_reinformer(K=6):
    torch.manual_seed(0)
    return reinformer.Reinformer(DTConfig(kind="reinformer", state_dim=S, act_dim=A, context_len=K, n_layer=2,
                                          n_head=2, n_embd=32, dropout=0.0)).eval()


def test_the_return_loss_is_the_expectile_regression_worked_by_hand():
    # Data returns 2 and 4 (mean |R| 3) against predictions 1 and 5: u = (1/3, -1/3). At the
    # expectile 0.9 the step the model under-predicts weighs 0.9, the one it over-predicts 0.1:
    # (0.9 * 1/9 + 0.1 * 1/9) / 2 = 1/18. A padded third step, wildly off, counts for nothing.
    pred, target = torch.tensor([[1.0, 5.0, 100.0]]), torch.tensor([[2.0, 4.0, -7.0]])
    mask = torch.tensor([[True, True, False]])
    assert reinformer.return_loss(pred, target, mask, 0.9).item() == pytest.approx(1 / 18)
    # The high expectile is what makes R̂ climb: the same error costs 9 times more below the data.
    below = reinformer.return_loss(torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.tensor([[True]]), 0.9)
    above = reinformer.return_loss(torch.tensor([[3.0]]), torch.tensor([[2.0]]), torch.tensor([[True]]), 0.9)
    assert below.item() == pytest.approx(9 * above.item())
    # All-zero returns (a maze far from its goal) divide by 1, not by 0.
    zero = reinformer.return_loss(torch.tensor([[0.5]]), torch.tensor([[0.0]]), torch.tensor([[True]]), 0.99)
    assert zero.item() == pytest.approx(0.01 * 0.25)


def test_the_return_never_sees_its_own_action_and_the_action_sees_the_return():
    model, K, j = tiny_reinformer(), 6, 3
    s, a, r, t = random_window(2, K)
    returns, actions = model(s, a, r, t)
    a2 = a.clone()
    a2[:, j] = -a2[:, j]  # a_j: after both s_j's and R_j's tokens
    returns2, actions2 = model(s, a2, r, t)
    torch.testing.assert_close(returns2[:, :j + 1], returns[:, :j + 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(actions2[:, :j + 1], actions[:, :j + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(returns2[:, j + 1:], returns[:, j + 1:])  # later steps do see it
    r2 = r.clone()
    r2[:, j] += 3.0  # R_j: after s_j's token, before a_j's
    returns3, actions3 = model(s, a, r2, t)
    torch.testing.assert_close(returns3[:, :j + 1], returns[:, :j + 1], rtol=0, atol=1e-6)  # R̂_j is s_j's
    torch.testing.assert_close(actions3[:, :j], actions[:, :j], rtol=0, atol=1e-6)
    assert not torch.allclose(actions3[:, j], actions[:, j])  # a_j reads R_j


def test_left_padding_gives_the_same_predictions_and_acting_is_the_forward_at_the_last_step():
    model, K, T = tiny_reinformer(), 6, 3
    s, a, r, t = random_window(2, K)
    unpadded = model(s[:, :T], a[:, :T], r[:, :T], t[:, :T])
    mask = torch.zeros(2, K, dtype=torch.bool)
    mask[:, K - T:] = True
    sp, ap, rp, tp = random_window(2, K, seed=1)  # garbage in the padded slots: only the mask hides it
    sp[:, K - T:], ap[:, K - T:], rp[:, K - T:], tp[:, K - T:] = s[:, :T], a[:, :T], r[:, :T], t[:, :T]
    padded = model(sp, ap, rp, tp, mask)
    for got, want in zip(padded, unpadded):
        torch.testing.assert_close(got[:, K - T:], want, rtol=0, atol=1e-5)
    # At test time: R̂ of the last step from its state alone, then a from the R̂ put in its place.
    torch.testing.assert_close(model.get_return(sp, ap, rp, tp, mask), unpadded[0][:, -1], rtol=0, atol=1e-5)
    torch.testing.assert_close(model.get_action(sp, ap, rp, tp, mask), unpadded[1][:, -1], rtol=0, atol=1e-5)


def test_the_policy_writes_its_predicted_return_where_the_dt_has_the_target():
    model = tiny_reinformer()
    policy = reinformer.MaxReturnPolicy(model, Normalization(torch.zeros(S), torch.ones(S), 1000.0), 1e9, 2, torch.device("cpu"))
    states = torch.randn(2, S, generator=torch.Generator().manual_seed(0))
    action = policy.act(states, np.zeros(2), 0)
    window = (policy.states, policy.actions * 0, policy.rtg, torch.zeros(2, 6, dtype=torch.long), policy.real)
    torch.testing.assert_close(policy.rtg[:, -1, 0], model.get_return(*window))  # not the 1e9 asked for
    torch.testing.assert_close(action, model.get_action(*window))
    assert policy.describe() == "max return, predicted"


def test_a_compiled_policy_compiles_both_of_its_forwards(monkeypatch):
    """--compile (the default on CUDA) captures the return's forward as well as the action's: each
    step runs both, and an eager one would leave half the step to kernel launches."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: seen.append(fn.__name__) or fn)
    reinformer.MaxReturnPolicy(tiny_reinformer(), Normalization(torch.zeros(S), torch.ones(S), 1000.0), None, 2,
                               torch.device("cpu"), compile=True)
    assert sorted(seen) == ["get_action", "get_return"]


def test_reinformer_trains_and_evaluates_with_no_target(tmp_path, capsys):
    data = write_d4rl(tmp_path / "halfcheetah-m.hdf5", [60] * 4)
    out = tmp_path / "r.pt"
    train.main(["--data", str(data), "--model", "reinformer", "--max-steps", "3", *TINY, "--out", str(out)])
    config = capsys.readouterr().out.splitlines()[0]
    assert "'model': 'reinformer'" in config and "'expectile': 0.99" in config and "'return_weight': 1.0" in config
    evaluate.main([str(out), "--episodes", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "reinformer" and result["policy"] == "max return, predicted"
    assert len(result["returns"]) == len(result["lengths"]) == 2


def test_bad_reinformer_flags_are_one_line(tmp_path):
    data = write_d4rl(tmp_path / "halfcheetah-b.hdf5", [30] * 2)
    for flags, words in ((["--model", "reinformer", "--expectile", "1.5"], "0 < --expectile < 1"),
                         (["--model", "reinformer", "--return-weight", "-1"], "--return-weight >= 0"),
                         (["--return-weight", "2"], "--return-weight: for --model reinformer only"),
                         (["--model", "reinformer", "--relabel-returns", "x.pt"], "for --model dt only")):
        assert_usage_error(run_cli("train.py", "--data", str(data), *flags), words)
