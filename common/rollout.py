"""
Rolling a policy out in its MuJoCo environment, many episodes side by side. evaluate.py and
train.py's --eval-every both go through `rollout`; tasks.py scores the returns. How a model picks
its actions is its policy's business (acting.WindowPolicy for the DT, its own for the others, as
checkpoint.MODEL_KINDS lists them); this file only steps the environments.

All episodes run in one gymnasium vector env, and each environment step is one batched model
forward for all of them. vecenv.py makes the environments: in this process, or with env_workers > 1
stepped by that many processes, for evaluations of hundreds of episodes; then the episodes are two
parts, and the policy's forward for one part runs while the other part's environments step.
"""
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from common.checkpoint import MODEL_KINDS, RunError
from common.vecenv import make_envs


class Episodes(NamedTuple):
    returns: np.ndarray  # (episodes,) undiscounted
    lengths: np.ndarray  # (episodes,) steps
    policy: str          # how the model acted: "target 3600", "planning, beam 32, horizon 5", ...


@torch.no_grad()
def rollout(model, norm, task, target, episodes, seed=0, progress=True, recorder=None, compile=False,
            env_workers=1, record=None, planning=None, bf16=False):
    """Run `episodes` episodes in parallel (episode i reset with seed + i), asking for `target`
    (a model that does not condition on a return is not handed it) -> Episodes: their undiscounted
    returns and their lengths in steps (a maze reached or a body fallen ends an episode early).
    `norm` is the data.Normalization the model
    was trained with. A video.Recorder, if given, gets every frame of episode 0. `compile` runs
    the policy through torch.compile, on CUDA as CUDA graphs (one step's few dozen kernel
    launches replayed as one). It is off by default: compiling (about 30 s on a CPU) costs more
    than it saves in one 1000-step rollout (docs/speed.md). `env_workers` processes step the
    environments (vecenv.py); a recorder needs its episode here, in one process. `record`, a
    list (or anything with append), gets the raw observations (episodes, obs size) after the
    reset and after every step, for pictures of the paths; nothing is kept without it. A
    planner's settings come in `planning`, a dict (a TT's beam_width and horizon). `bf16` runs the
    policy's forward under bf16 autocast (device.evaluates_in_bf16)."""
    envs = make_envs(task, episodes, recorder, env_workers)
    check_env_matches(envs, task.env_id, model.cfg)
    device = next(model.parameters()).device
    norm = norm.to(device)
    max_steps = task.max_episode_steps or envs.spec.max_episode_steps or 1000
    # One policy per part of the episodes (vecenv.py: two when workers step them), each with its
    # own windows or plans.
    kind = MODEL_KINDS[model.cfg.kind]
    target = target if kind.conditioned else None
    policies = [kind.policy(model, norm, target, hi - lo, device, compile=compile, bf16=bf16, planning=planning or {})
                for lo, hi in envs.parts]
    returns, lengths = np.zeros(episodes), np.zeros(episodes, np.int64)
    done = np.zeros(episodes, bool)

    model.eval()
    obs, _ = envs.reset(seed=seed)
    if record is not None:
        record.append(np.array(obs))
    if recorder:
        recorder.capture(envs.envs[0])
    bar = tqdm(total=max_steps, desc=policies[0].describe(), leave=False, disable=not progress)
    # Each step: for each part, its last step's results in (after the first), then its next actions
    # out. With two parts, one part's environments step in the workers while the policy works out
    # the other's actions. A part whose episodes have all ended stops stepping.
    stepping = [True] * len(envs.parts)
    for t in range(max_steps + 1):
        for i, (lo, hi) in enumerate(envs.parts):
            if not stepping[i]:
                continue
            if t > 0:
                obs[lo:hi], reward, terminated, truncated = envs.receive(i)
                if recorder and not done[0]:  # episode 0's frames, its last one included
                    recorder.capture(envs.envs[0])  # (a recorder means one part, in this process)
                policies[i].observe(reward)
                returns[lo:hi] += np.where(done[lo:hi], 0.0, reward)  # a finished episode stops counting
                lengths[lo:hi] += ~done[lo:hi]
                done[lo:hi] |= terminated | truncated
                stepping[i] = t < max_steps and not done[lo:hi].all()
                if not stepping[i]:
                    continue
            states = norm.states(torch.as_tensor(obs[lo:hi], dtype=torch.float32, device=device))
            envs.send(i, policies[i].act(states, returns[lo:hi], t).float().cpu().numpy())
        if t > 0:
            if record is not None:
                record.append(np.array(obs))
            bar.update()
        if not any(stepping):
            break
    bar.close()
    envs.close()
    return Episodes(returns, lengths, policies[0].describe())


def check_env_matches(envs, env_id, cfg):
    obs_dim = envs.single_observation_space.shape[0]
    act_dim = envs.single_action_space.shape[0]
    if (obs_dim, act_dim) != (cfg.state_dim, cfg.act_dim):
        raise RunError(
            f"{env_id} has observations of size {obs_dim} and actions of size {act_dim}, but the "
            f"model was trained for {cfg.state_dim} and {cfg.act_dim}")
