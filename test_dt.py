"""The Decision Transformer's specification: causality, left padding, get_action as the last step
of the full forward, and the pipeline around it (returns-to-go, windows, a few training steps
that lower the loss, a rollout scored as D4RL does).

Tests: CPU only, no network, small synthetic data made under pytest's tmp_path. The other files
are under tests/, one per file under test; tests/helpers.py holds what they share."""
import csv
import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
import train
from data import episode_ends, load_trajectories, returns_to_go, sample_batch
from model import (DecisionTransformer, DTConfig, attention_with_dropout, causal_mask, configure_optimizer,
                   padded_causal_mask)
from tests.helpers import A, S, dataset, random_window, tiny_model, trained, write_d4rl  # noqa: F401 (fixtures)


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


@pytest.mark.parametrize("padded", [False, True])
def test_attention_written_out_for_training_on_a_cpu_is_sdpas(padded):
    """Training on a CPU writes attention out (faster there than SDPA's path with dropout); it is
    the same attention, and its dropout drops weights without biasing them."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 24, 8).unbind(0)  # (B, nh, 3K, hs) each, K = 8
    mask = padded_causal_mask(torch.arange(8).expand(2, 8) >= torch.tensor([[0], [5]])) if padded \
        else causal_mask(24, "cpu")
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention_with_dropout(q, k, v, mask, 0.0), sdpa, rtol=0, atol=1e-5)
    draws = torch.stack([attention_with_dropout(q, k, v, mask, 0.1) for _ in range(4000)])
    assert not torch.allclose(draws[0], sdpa)
    torch.testing.assert_close(draws.mean(0), sdpa, rtol=0, atol=0.1)


def test_weight_decay_only_on_matrices():
    opt = configure_optimizer(tiny_model(), 1e-3, 0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])


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


def test_lr_schedule_warms_up_then_decays():
    lrs = [train.get_lr(s, 100, 1e-3) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_a_few_training_steps_lower_the_loss(trained):
    with open(trained.with_suffix(".csv")) as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 8
    assert losses[-1] < 0.6 * losses[0]


def test_rollout_in_halfcheetah_reports_returns_and_normalized_score(trained, capsys):
    evaluate.main([str(trained), "--target", "3000", "6000", "--episodes", "2", "--json"])
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["target"] for r in results] == [3000, 6000]
    for r in results:
        assert r["env"] == "HalfCheetah-v5" and r["episodes"] == 2 and len(r["returns"]) == 2
        assert r["mean_return"] == pytest.approx(np.mean(r["returns"]), abs=0.01)
        assert r["normalized_score"] == pytest.approx(
            100 * (r["mean_return"] + 280.178953) / (12135.0 + 280.178953))
