"""
Rolling a policy out in its MuJoCo environment, many episodes side by side. evaluate.py and
train.py's --eval-every both go through `rollout`; tasks.py scores the returns.

All episodes run in one gymnasium vector env, and each environment step is one batched model
forward for all of them. vecenv.py makes the environments: in this process, or with env_workers > 1
stepped by that many processes, for evaluations of hundreds of episodes.
"""
import numpy as np
import torch
from tqdm import tqdm

from checkpoint import RunError
from vecenv import make_envs


@torch.no_grad()
def rollout(model, norm, task, target, episodes, seed=0, progress=True, recorder=None, compile=False,
            env_workers=1, record=None):
    """Run `episodes` episodes in parallel (episode i reset with seed + i), asking for `target`;
    returns their undiscounted returns (np.ndarray). `norm` is the data.Normalization the model
    was trained with. A video.Recorder, if given, gets every frame of episode 0. `compile` runs
    the policy through torch.compile, on CUDA as CUDA graphs (one step's few dozen kernel
    launches replayed as one). It is off by default: compiling (about 30 s on a CPU) costs more
    than it saves in one 1000-step rollout (README, Speed). `env_workers` processes step the
    environments (vecenv.py); a recorder needs its episode here, in one process. `record`, a
    list, gets every step's raw observations (episodes, obs size) for pictures of the paths."""
    envs = make_envs(task, episodes, recorder, env_workers)
    check_env_matches(envs, task.env_id, model.cfg)
    device = next(model.parameters()).device
    norm = norm.to(device)
    max_steps = task.max_episode_steps or envs.spec.max_episode_steps or 1000
    policy = model.get_action
    if compile:
        policy = torch.compile(policy, mode="reduce-overhead" if device.type == "cuda" else None)
    # Each episode's last K steps, shifted one step left every step and left-padded (mask False)
    # until K steps have passed, so the policy is called with the same shapes every time.
    K, S, A = model.cfg.context_len, model.cfg.state_dim, model.cfg.act_dim
    states = torch.zeros(episodes, K, S, device=device)
    actions = torch.zeros(episodes, K, A, device=device)  # zeros: the not-yet-taken action
    rtg = torch.zeros(episodes, K, 1, device=device)
    real = torch.zeros(episodes, K, dtype=torch.bool, device=device)
    returns = np.zeros(episodes)
    done = np.zeros(episodes, bool)

    model.eval()
    obs, _ = envs.reset(seed=seed)
    if record is not None:
        record.append(np.array(obs))
    if recorder:
        recorder.capture(envs.envs[0])
    bar = tqdm(total=max_steps, desc=f"target {target:g}", leave=False, disable=not progress)
    for t in range(max_steps):
        if t > 0:
            for window in (states, actions, rtg, real):
                window.copy_(window.roll(-1, dims=1))
            actions[:, -1] = 0.0
        states[:, -1] = norm.states(torch.as_tensor(obs, dtype=torch.float32, device=device))
        rtg[:, -1, 0] = torch.as_tensor(norm.return_to_go(target, returns), dtype=torch.float32)
        real[:, -1] = True
        # Absolute episode times of the window's steps; padded steps get 0, as in training.
        timesteps = torch.arange(t - K + 1, t + 1, device=device).clamp(min=0).expand(episodes, K)
        action = policy(states, actions, rtg, timesteps, real if t < K - 1 else None)
        actions[:, -1] = action
        obs, reward, terminated, truncated, _ = envs.step(action.float().cpu().numpy())
        returns += np.where(done, 0.0, reward)  # a finished episode stops counting
        if record is not None:
            record.append(np.array(obs))
        if recorder and not done[0]:
            recorder.capture(envs.envs[0])
        done |= terminated | truncated
        bar.update()
        if done.all():
            break
    bar.close()
    envs.close()
    return returns


def check_env_matches(envs, env_id, cfg):
    obs_dim = envs.single_observation_space.shape[0]
    act_dim = envs.single_action_space.shape[0]
    if (obs_dim, act_dim) != (cfg.state_dim, cfg.act_dim):
        raise RunError(
            f"{env_id} has observations of size {obs_dim} and actions of size {act_dim}, but the "
            f"model was trained for {cfg.state_dim} and {cfg.act_dim}")
