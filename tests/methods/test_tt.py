"""Tests of tt.py and plan.py, the Trajectory Transformer: its tokens, its causality, its cache, its
beam search, and its place in train.py and evaluate.py."""
import json

import numpy as np
import torch

import evaluate
import train
from common import device
from common.checkpoint import load_checkpoint
from methods import plan, tt
from tests.helpers import assert_one_line_error, assert_usage_error, run_cli, write_d4rl

SMALL = tt.TTConfig(state_dim=3, act_dim=2, n_bins=10, n_transitions=4, n_layer=2, n_head=2, n_embd=16, dropout=0.0)


def random_tokens(cfg, batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.n_bins + 1, (batch, length), generator=g)


def test_decoding_an_encoded_value_is_less_than_a_bin_away():
    rng = np.random.default_rng(0)
    data = np.stack([rng.normal(size=5000), rng.exponential(size=5000), rng.integers(0, 3, 5000)], 1)
    disc = tt.Discretizer.fit(data, 100)
    x = torch.as_tensor(data, dtype=torch.float32)
    bins = disc.encode(x)
    assert bins.min() >= 0 and bins.max() < 100
    width = (disc.edges[1:] - disc.edges[:-1])[bins, torch.arange(3)]  # the width of each value's bin
    error = (disc.decode(bins) - x).abs()
    assert (error <= width / 2 + 1e-6).all()  # decoded as its bin's midpoint: half a bin at most


def test_no_token_sees_a_later_one_or_any_value_token():
    torch.manual_seed(0)
    model = tt.TrajectoryTransformer(SMALL).eval()
    D = SMALL.transition_dim
    tokens = random_tokens(SMALL, 2, 4 * D - 1)
    with torch.no_grad():
        base = model(tokens)
        for t in range(tokens.shape[1]):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % (SMALL.n_bins + 1)
            out = model(changed)
            torch.testing.assert_close(out[:, :t], base[:, :t])  # earlier positions never see token t
            if t % D == D - 1:  # a V token: no other position reads it
                others = [i for i in range(tokens.shape[1]) if i != t]
                torch.testing.assert_close(out[:, others], base[:, others])


def test_cached_generation_equals_the_full_forward():
    torch.manual_seed(0)
    model = tt.TrajectoryTransformer(SMALL).eval()
    tokens = random_tokens(SMALL, 3, 4 * SMALL.transition_dim)
    with torch.no_grad():
        full = model(tokens)
        logits, cache = model.extend(tokens[:, :9])
        pieces = [logits]
        for i in range(9, tokens.shape[1]):  # then one token at a time, as planning does
            logits, cache = model.extend(tokens[:, i:i + 1], cache)
            pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_beams_that_share_a_prefix_equal_the_full_forward():
    """As planning uses the cache: two episodes' prefixes read once, shared by three beams each,
    the beams kept and repeated within their episode, then each beam's own tokens."""
    torch.manual_seed(0)
    model = tt.TrajectoryTransformer(SMALL).eval()
    D = SMALL.transition_dim
    prefix = random_tokens(SMALL, 2, D + 3)  # a transition and a state, per episode
    own = random_tokens(SMALL, 6, 2 * D, seed=1)  # each beam's tokens after it
    kept = torch.tensor([1, 1, 0, 5, 3, 3])  # after 4 own tokens: within each episode's three beams
    with torch.no_grad():
        _, cache = model.extend(prefix)
        cache.share(3)
        first, cache = model.extend(own[:, :4], cache)
        cache.take(kept)
        rest = [model.extend(own[kept, i:i + 1], cache)[0] for i in range(4, own.shape[1])]
        rows = torch.cat((prefix.repeat_interleave(3, dim=0), own), dim=1)
        full = model(rows)
    P = prefix.shape[1]
    torch.testing.assert_close(first, full[:, P:P + 4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(rest, dim=1), model(rows[kept])[:, P + 4:], rtol=1e-5, atol=1e-5)


class RewardForActionTwo:
    """A hand-built stand-in for the model, for one state dimension and one action dimension, 4
    bins: any action token is equally likely, and the reward that follows is bin 3 after action 2
    and bin 0 after any other; values and states are always bin 0. The best plan starts with 2."""

    cfg = tt.TTConfig(state_dim=1, act_dim=1, n_bins=4, n_transitions=8, discount=0.9)
    block_size = 8 * 4

    class Cache:
        def __init__(self, seq):
            self.seq = seq

        @property
        def position(self):
            return self.seq.shape[1]

        def take(self, rows):
            self.seq = self.seq[rows]

        def share(self, copies):
            self.take(torch.arange(len(self.seq)).repeat_interleave(copies))

    def extend(self, tokens, cache=None):
        seq = torch.cat((cache.seq, tokens), dim=1) if cache else tokens
        logits = torch.full((*tokens.shape, 5), -30.0)
        for j in range(tokens.shape[1]):
            pos = seq.shape[1] - tokens.shape[1] + j  # the position of the token that predicts the next
            slot = (pos + 1) % 4  # what comes next: 0 state, 1 action, 2 reward, 3 value
            if slot == 1:
                logits[:, j, :4] = 0.0
            elif slot == 2:
                logits[:, j, 0] = torch.where(seq[:, pos] == 2, -30.0, 30.0)
                logits[:, j, 3] = torch.where(seq[:, pos] == 2, 30.0, -30.0)
            else:
                logits[:, j, 0] = 30.0
        return logits, self.Cache(seq)


def test_beam_search_finds_the_plan_that_earns_the_most():
    stub = RewardForActionTwo()
    disc = tt.Discretizer(np.arange(5, dtype=np.float32)[:, None].repeat(4, 1) - 0.5)  # bin k decodes as k
    prefix = torch.zeros(3, 1, dtype=torch.long)  # three episodes, each at state bin 0
    settings = plan.PlanSettings(horizon=3, beam_width=8, n_expand=4)
    actions, predicted = plan.plan(stub, disc, prefix, settings, torch.Generator().manual_seed(0))
    assert actions.tolist() == [[2], [2], [2]]
    assert predicted[:, :3].tolist() == [[3.0, 3.0, 3.0]] * 3  # action 2 at every step of the plan


def test_a_tt_run_trains_and_plans_end_to_end(tmp_path, capsys, monkeypatch):
    """A plan is searched in fp32 and says so, even where a DT trained in bf16 would evaluate in it."""
    for module in (device, train):  # train.py imported the function itself
        monkeypatch.setattr(module, "bf16_pays", lambda d: True)
    data = write_d4rl(tmp_path / "hopper-tt.hdf5", [40, 15, 70, 9, 33, 25], state_dim=11, act_dim=3)
    out = tmp_path / "tt.pt"
    train.main(["--data", str(data), "--model", "tt", "--max-steps", "3", "--batch-size", "4", "--n-layer", "1",
                "--n-head", "2", "--n-embd", "16", "--out", str(out)])
    assert "'n_head': 2" in capsys.readouterr().out
    model, norm, ckpt = load_checkpoint(out)
    assert isinstance(model, tt.TrajectoryTransformer) and norm.bins.shape == (101, 11 + 3 + 2)
    evaluate.main([str(out), "--episodes", "2", "--beam-width", "2", "--horizon", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert (result["model"], result["beam_width"], result["horizon"]) == ("tt", 2, 2)
    assert result["seconds_per_step"] > 0 and len(result["returns"]) == 2
    assert load_checkpoint(out)[2]["bf16"] and result["precision"] == "fp32"


def test_the_penalty_and_the_value_follow_the_paper(tmp_path):
    # One episode that falls after 3 steps (rewards 1, 2, 3), then one cut by the time limit.
    path = write_d4rl(tmp_path / "hopper-v.hdf5", [3, 4], state_dim=11, act_dim=3)
    import h5py
    with h5py.File(path, "a") as f:
        f["rewards"][...] = [1, 2, 3, 1, 1, 1, 1]
        f["terminals"][...] = [0, 0, 1, 0, 0, 0, 0]
        f["timeouts"][...] = [0, 0, 0, 0, 0, 0, 1]
    from data import load_trajectories
    data, _ = load_trajectories(path)
    rows, last, terminal_end = tt.transitions_table(data, 0.5)
    assert rows[:, -2].tolist() == [1, 2, tt.TERMINATION_PENALTY, 1, 1, 1, 1]
    assert rows[:3, -1].tolist() == [2 + 0.5 * tt.TERMINATION_PENALTY, tt.TERMINATION_PENALTY, 0]
    assert last.tolist() == [2, 2, 2, 6, 6, 6, 6] and terminal_end.tolist() == [True] * 3 + [False] * 4


def test_windows_end_in_termination_tokens_trained_only_after_a_fall():
    tokens = tt.TokenData(tokens=torch.arange(7)[:, None].repeat(1, SMALL.transition_dim),
                          last=torch.tensor([2, 2, 2, 6, 6, 6, 6]), terminal_end=torch.tensor([True] * 3 + [False] * 4))
    inputs, targets, mask = tt.sample_windows(tokens, SMALL, 200, torch.Generator().manual_seed(0))
    D, N = SMALL.transition_dim, SMALL.n_bins
    rows = torch.cat((inputs[:, :1], targets), dim=1).view(200, 4, D)
    keep = torch.cat((torch.ones(200, 1, dtype=torch.bool), mask), dim=1).view(200, 4, D)
    for row, kept in zip(rows, keep):
        first = int(row[0, 0])
        end = 2 if first <= 2 else 6
        for k in range(4):
            if first + k <= end:
                assert (row[k] == first + k).all() and kept[k].all()
            else:  # past the episode: termination tokens, trained after the fall, masked after a cut
                assert (row[k] == N).all() and kept[k].all() == (end == 2)


def test_bad_planning_flags_are_one_line(tmp_path, trained):
    assert_usage_error(run_cli("evaluate.py", str(trained), "--beam-width", "0"), "--beam-width must be at least 1")
    assert_usage_error(run_cli("evaluate.py", str(trained), "--horizon", "-2"), "--horizon must be at least 1")
    assert_one_line_error(run_cli("evaluate.py", str(trained), "--horizon", "3"), "for a TT checkpoint")
