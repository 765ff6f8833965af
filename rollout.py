"""
Rolling a policy out in its MuJoCo environment, many episodes side by side, and scoring the returns
as D4RL does. evaluate.py and train.py's --eval-every both go through `rollout`.

All episodes run in one gymnasium vector env, and each environment step is one batched model
forward for all of them.
"""
import sys

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import RunError

# D4RL's reference returns (d4rl/infos.py): a random policy and the expert used to normalize
# scores, 100 * (R - random) / (expert - random).
D4RL_REF_RETURNS = {
    "HalfCheetah": (-280.178953, 12135.0),
    "Hopper": (-20.272305, 3234.3),
    "Walker2d": (1.629008, 4592.3),
}
# Return asked for when no --target is given: the DT paper's, a little above the best episodes
# in D4RL's expert data.
DEFAULT_TARGETS = {"HalfCheetah": 12000.0, "Hopper": 3600.0, "Walker2d": 5000.0}


def body(env_id):
    return env_id.split("-")[0]


def normalized_score(env_id, ret):
    low, high = D4RL_REF_RETURNS[body(env_id)]
    return 100.0 * (ret - low) / (high - low)


@torch.no_grad()
def rollout(model, norm, env_id, target, episodes, seed=0, progress=True, recorder=None):
    """Run `episodes` episodes in parallel (episode i reset with seed + i), asking for `target`;
    returns their undiscounted returns (np.ndarray). `norm` is the data.Normalization the model
    was trained with. A video.Recorder, if given, gets every frame of episode 0."""
    envs = make_envs(env_id, episodes, recorder)
    check_env_matches(envs, env_id, model.cfg)
    device = next(model.parameters()).device
    norm = norm.to(device)
    max_steps = envs.envs[0].spec.max_episode_steps or 1000
    S, A = model.cfg.state_dim, model.cfg.act_dim
    # Each episode's whole history so far; get_action reads the last K steps of it.
    states = torch.zeros(episodes, max_steps, S, device=device)
    actions = torch.zeros(episodes, max_steps, A, device=device)  # zeros: the not-yet-taken action
    rtg = torch.zeros(episodes, max_steps, 1, device=device)
    timesteps = torch.arange(max_steps, device=device).expand(episodes, max_steps)
    returns = np.zeros(episodes)
    done = np.zeros(episodes, bool)

    model.eval()
    obs, _ = envs.reset(seed=seed)
    if recorder:
        recorder.capture(envs.envs[0])
    bar = tqdm(total=max_steps, desc=f"target {target:g}", leave=False, disable=not progress)
    for t in range(max_steps):
        states[:, t] = norm.states(torch.as_tensor(obs, dtype=torch.float32, device=device))
        rtg[:, t, 0] = torch.as_tensor(norm.return_to_go(target, returns), dtype=torch.float32)
        action = model.get_action(states[:, :t + 1], actions[:, :t + 1], rtg[:, :t + 1], timesteps[:, :t + 1])
        actions[:, t] = action
        obs, reward, terminated, truncated, _ = envs.step(action.float().cpu().numpy())
        returns += np.where(done, 0.0, reward)  # a finished episode stops counting
        if recorder and not done[0]:
            recorder.capture(envs.envs[0])
        done |= terminated | truncated
        bar.update()
        if done.all():
            break
    bar.close()
    envs.close()
    return returns


def make_envs(env_id, num_envs, recorder=None):
    import gymnasium as gym

    quiet_mujoco()
    # Rendering is set up in every env but costs nothing until render() is called (on env 0 only).
    try:
        envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                            **(recorder.env_kwargs if recorder else {}))
    except gym.error.Error as e:
        raise RunError(f"cannot make environment {env_id!r}: {e}") from None
    if recorder:
        recorder.prepare(envs.envs[0])
    return envs


def quiet_mujoco():
    """MuJoCo 4 warns on every load of HalfCheetah's XML that `settotalmass` is deprecated; it is
    gymnasium's model file, not something a user can act on. Other MuJoCo warnings still print."""
    import mujoco

    def warn(msg):
        if "settotalmass" not in msg:
            print(f"MuJoCo warning: {msg}", file=sys.stderr)

    mujoco.set_mju_user_warning(warn)


def check_env_matches(envs, env_id, cfg):
    obs_dim = envs.single_observation_space.shape[0]
    act_dim = envs.single_action_space.shape[0]
    if (obs_dim, act_dim) != (cfg.state_dim, cfg.act_dim):
        raise RunError(
            f"{env_id} has observations of size {obs_dim} and actions of size {act_dim}, but the "
            f"model was trained for {cfg.state_dim} and {cfg.act_dim}")
