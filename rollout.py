"""
Rolling a policy out in its MuJoCo environment, many episodes side by side. evaluate.py and
train.py's --eval-every both go through `rollout`; tasks.py scores the returns.

All episodes run in one gymnasium vector env, and each environment step is one batched model
forward for all of them. vecenv.py makes the environments: in this process, or with env_workers > 1
stepped by that many processes, for evaluations of hundreds of episodes; then the episodes are two
parts, and the policy's forward for one part runs while the other part's environments step.
"""
import numpy as np
import torch
from tqdm import tqdm

from checkpoint import RunError
from plan import Planner, PlanSettings
from tt import TrajectoryTransformer
from vecenv import make_envs


@torch.no_grad()
def rollout(model, norm, task, target, episodes, seed=0, progress=True, recorder=None, compile=False,
            env_workers=1, record=None, planning=None, bf16=False):
    """Run `episodes` episodes in parallel (episode i reset with seed + i), asking for `target`;
    returns their undiscounted returns (np.ndarray). `norm` is the data.Normalization the model
    was trained with. A video.Recorder, if given, gets every frame of episode 0. `compile` runs
    the policy through torch.compile, on CUDA as CUDA graphs (one step's few dozen kernel
    launches replayed as one). It is off by default: compiling (about 30 s on a CPU) costs more
    than it saves in one 1000-step rollout (docs/speed.md). `env_workers` processes step the
    environments (vecenv.py); a recorder needs its episode here, in one process. `record`, a
    list (or anything with append), gets the raw observations (episodes, obs size) after the
    reset and after every step, for pictures of the paths. A Trajectory Transformer plans instead
    (plan.Planner, with `planning`, a plan.PlanSettings). `bf16` runs the DT's, BC's and IQL's forward
    under bf16 autocast (device.evaluates_in_bf16)."""
    envs = make_envs(task, episodes, recorder, env_workers)
    check_env_matches(envs, task.env_id, model.cfg)
    device = next(model.parameters()).device
    norm = norm.to(device)
    max_steps = task.max_episode_steps or envs.spec.max_episode_steps or 1000
    # One policy per part of the episodes (vecenv.py: two when workers step them), each with its
    # own windows or plans.
    if isinstance(model, TrajectoryTransformer):
        policies = [Planner(model, norm, hi - lo, planning or PlanSettings(), device) for lo, hi in envs.parts]
    else:
        acting = MaxReturnPolicy if model.cfg.kind == "reinformer" else WindowPolicy
        policies = [acting(model, norm, target, hi - lo, device, compile, bf16) for lo, hi in envs.parts]
    returns = np.zeros(episodes)
    done = np.zeros(episodes, bool)

    model.eval()
    obs, _ = envs.reset(seed=seed)
    if record is not None:
        record.append(np.array(obs))
    if recorder:
        recorder.capture(envs.envs[0])
    desc = "planning" if isinstance(model, TrajectoryTransformer) else f"target {target:g}"
    bar = tqdm(total=max_steps, desc=desc, leave=False, disable=not progress)
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
    return returns


class WindowPolicy:
    """How the DT (and BC and IQL, which read only the last state) act: each episode's last K
    steps, shifted one step left every step and left-padded (mask False) until K steps have
    passed, so the policy is called with the same shapes every time; the return-to-go counts down
    from the target."""

    def __init__(self, model, norm, target, episodes, device, compile, bf16):
        self.norm, self.target, self.device = norm, target, device
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        self.model, self.policy = model, model.get_action
        if compile:
            self.policy = torch.compile(self.policy, mode="reduce-overhead" if device.type == "cuda" else None)
        K, S, A = model.cfg.context_len, model.cfg.state_dim, model.cfg.act_dim
        self.states = torch.zeros(episodes, K, S, device=device)
        self.actions = torch.zeros(episodes, K, A, device=device)  # zeros: the not-yet-taken action
        self.rtg = torch.zeros(episodes, K, 1, device=device)
        self.real = torch.zeros(episodes, K, dtype=torch.bool, device=device)

    def act(self, states, returns, t):
        """(E, S) normalized states, each episode's return so far, the step -> (E, A) actions."""
        window = self.advance(states, t)
        self.rtg[:, -1, 0] = torch.as_tensor(self.norm.return_to_go(self.target, returns), dtype=torch.float32)
        with self.amp:
            action = self.policy(*window).float()
        self.actions[:, -1] = action
        return action

    def advance(self, states, t):
        """Shift the windows one step and put the new states in: -> the model's inputs (states,
        actions, returns-to-go, timesteps, mask), the last action and return-to-go still zeros."""
        K = self.states.shape[1]
        if t > 0:
            for window in (self.states, self.actions, self.rtg, self.real):
                window.copy_(window.roll(-1, dims=1))
            self.actions[:, -1] = 0.0
            self.rtg[:, -1] = 0.0
        self.states[:, -1] = states
        self.real[:, -1] = True
        # Absolute episode times of the window's steps; padded steps get 0, as in training.
        timesteps = torch.arange(t - K + 1, t + 1, device=self.device).clamp(min=0).expand(len(states), K)
        return self.states, self.actions, self.rtg, timesteps, self.real if t < K - 1 else None

    def observe(self, rewards):
        """The window holds returns-to-go, not rewards: nothing to add."""


class MaxReturnPolicy(WindowPolicy):
    """How Reinformer acts: no target; every step it predicts the return R̂ from the new state,
    writes it where the DT would have the return-to-go, and takes the action read off it."""

    def act(self, states, returns, t):
        window = self.advance(states, t)
        with self.amp:
            self.rtg[:, -1, 0] = self.model.get_return(*window).float()
            action = self.model.get_action(*window).float()
        self.actions[:, -1] = action
        return action


def check_env_matches(envs, env_id, cfg):
    obs_dim = envs.single_observation_space.shape[0]
    act_dim = envs.single_action_space.shape[0]
    if (obs_dim, act_dim) != (cfg.state_dim, cfg.act_dim):
        raise RunError(
            f"{env_id} has observations of size {obs_dim} and actions of size {act_dim}, but the "
            f"model was trained for {cfg.state_dim} and {cfg.act_dim}")
