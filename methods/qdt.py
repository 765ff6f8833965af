"""
The QDT relabelling (Yamagata, Khalil and Santos-Rodriguez, ICML 2023, "Q-learning Decision
Transformer"): `python train.py --relabel-returns IQL_CKPT` trains the DT on returns-to-go in
which a learned value replaces the episode's own return wherever the value is higher.

A DT's return-to-go is what *this* episode went on to collect, so a step on a route that could
have joined a better one is labelled with the worse ending. A value function learned by Bellman
backups carries the better ending's value across episodes; relabelled_returns_to_go puts it
into the labels, R_t = max(V(s_t), r_t + R_{t+1}), and the DT is trained as before. Here the value
is IQL's V (iql.py), trained on the same file with the same rewards.
"""
import numpy as np
import torch

from common.checkpoint import CheckpointError, load_checkpoint
from methods.iql import iql_reward_scale


def relabel(data, ckpt_path, reward_mode):
    """data.returns_to_go relabelled with the V of the IQL checkpoint at `ckpt_path`, which must
    have been trained on this data (the same states' statistics) with the same `reward_mode`."""
    model, norm, ckpt = load_checkpoint(ckpt_path)
    if model.cfg.kind != "iql":
        raise CheckpointError(f"--relabel-returns {ckpt_path}: a {model.cfg.kind.upper()} checkpoint; the "
                              f"relabelling needs IQL's value (train.py --model iql on the same data)")
    if not (torch.equal(norm.state_mean, data.norm.state_mean) and torch.equal(norm.state_std, data.norm.state_std)):
        raise CheckpointError(f"--relabel-returns {ckpt_path}: its IQL was trained on other data "
                              f"({ckpt['env_id']}, different observation statistics)")
    if norm.reward_mode != reward_mode:
        raise CheckpointError(f"--relabel-returns {ckpt_path}: its IQL was trained on {norm.reward_mode} "
                              f"rewards, this run is on {reward_mode} ones")
    with torch.no_grad():
        values = model.value(data.states).double()
    # IQL's V is in its own reward units (iql_reward_scale times the file's, worked out from the
    # same episodes): back to the file's, the DT's.
    values /= iql_reward_scale(data.episode_returns, data.sparse)
    rtg = relabelled_returns_to_go(data.rewards.numpy(), data.episode_ends().numpy(), values.numpy())
    data.returns_to_go = torch.as_tensor(rtg / data.norm.reward_scale, dtype=torch.float32)
    return values


def relabelled_returns_to_go(rewards, ends, values):
    """QDT's returns-to-go (Yamagata et al. 2023): backwards through each episode,
    R_t = max(V(s_t), r_t + R_{t+1}), restarting at every episode end. Where a learned value
    says more can be collected from s_t than this episode went on to collect, the label takes
    the value, and the steps before it inherit it: a route that joins a better one carries that
    one's return back into its own episode, which an episode's own return-to-go cannot."""
    rewards, ends, values = (np.asarray(a, np.float64).tolist() for a in (rewards, ends, values))
    out = [0.0] * len(rewards)
    running = 0.0
    for i in range(len(rewards) - 1, -1, -1):
        if ends[i]:
            running = 0.0
        running = max(values[i], rewards[i] + running)
        out[i] = running
    return np.array(out)
