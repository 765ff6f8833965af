"""
Trajectory data: a D4RL-style HDF5 file -> normalized states, returns-to-go and batches of windows.

D4RL stores every episode back to back in flat arrays (`observations`, `actions`, `rewards`,
`terminals`, `timeouts`); an episode ends where `terminals` (the MDP ended) or `timeouts` (the time
limit cut it) is true. Minari's files (one group per episode) are flattened into the same arrays.
Everything is read once into contiguous tensors; a batch is then a handful
of vectorised index operations, with no Python loop per sample.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")

# Which gymnasium environment a dataset belongs to, from its file name (D4RL names start with the
# body: halfcheetah-expert-v2.hdf5). D4RL's v2 data came from the old mujoco-py v2 envs, which
# gymnasium no longer ships; v5 has the same bodies, observations and rewards.
ENV_IDS = {"halfcheetah": "HalfCheetah-v5", "hopper": "Hopper-v5", "walker2d": "Walker2d-v5"}

# The DT paper divides rewards and returns-to-go by 1000 for the MuJoCo bodies so the return
# input is O(1)-O(10) rather than O(10^4).
REWARD_SCALE = 1000.0


class DataError(Exception):
    """A data file that cannot be used; the message names the file and the problem."""


@dataclass
class Trajectories:
    states: torch.Tensor         # (N, S) float32, normalized with state_mean/state_std
    actions: torch.Tensor        # (N, A) float32
    returns_to_go: torch.Tensor  # (N,) float32, divided by reward_scale
    timesteps: torch.Tensor      # (N,) int64, step index inside its episode
    episode_start: torch.Tensor  # (N,) int64, flat index of the first step of the step's episode
    episode_returns: np.ndarray  # (E,) float64, undiscounted, unscaled, true (dense) rewards
    episodes_in_file: int        # E before keeping only the best episodes
    state_mean: torch.Tensor     # (S,)
    state_std: torch.Tensor      # (S,)
    reward_scale: float

    @property
    def num_steps(self):
        return self.states.shape[0]

    @property
    def state_dim(self):
        return self.states.shape[1]

    @property
    def act_dim(self):
        return self.actions.shape[1]

    def to(self, device):
        for name in ("states", "actions", "returns_to_go", "timesteps", "episode_start"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def env_id_for(path):
    """Guess the gymnasium env id from a dataset file name (None when it names no known body)."""
    name = Path(path).name.lower()
    for body, env_id in ENV_IDS.items():
        if name.startswith(body):
            return env_id
    return None


def one_line(error):
    text = str(error).strip().strip("'\"").splitlines()
    return text[0] if text else type(error).__name__


def read_key(f, key, path):
    """One of the D4RL arrays (None if absent), checked to hold numbers."""
    try:
        if key not in f:
            return None
        node = f[key]
        if not isinstance(node, h5py.Dataset):
            raise DataError(f"{path}: key '{key}' is a group, not an array")
        if node.dtype.kind not in "biuf":
            raise DataError(f"{path}: key '{key}' holds {node.dtype}, not numbers")
        return np.asarray(node[()])
    except DataError:
        raise
    except Exception as e:
        # The file is untrusted input: h5py reports damage as OSError, KeyError, RuntimeError or
        # ValueError depending on which internal structure is broken.
        raise DataError(f"{path}: key '{key}' cannot be read, the file is damaged ({one_line(e)})") from None


def check_arrays(arrays, path):
    """The shapes and values D4RL promises: (N, S) observations, (N, A) actions and (N,) rewards
    and flags, all finite. Anything else would fail later, far from its cause."""
    for key, ndim in (("observations", 2), ("actions", 2), ("rewards", 1), ("terminals", 1), ("timeouts", 1)):
        a = arrays[key]
        if a.ndim != ndim or (ndim == 2 and a.shape[1] == 0):
            raise DataError(f"{path}: key '{key}' has shape {a.shape}, expected "
                            f"{'(steps, size)' if ndim == 2 else '(steps,)'}")
    n = len(arrays["observations"])
    if n == 0:
        raise DataError(f"{path}: key 'observations' holds no steps")
    for key, a in arrays.items():
        if len(a) != n:
            raise DataError(f"{path}: key '{key}' has {len(a)} rows but 'observations' has {n}")
        bad = np.flatnonzero(~np.isfinite(a).reshape(n, -1).all(1))
        if len(bad):
            raise DataError(f"{path}: key '{key}' has NaN or Inf values (first in row {bad[0]})")


# Minari (D4RL's maintained successor) keeps one group per episode, with its own key names.
MINARI_KEYS = {"observations": "observations", "actions": "actions", "rewards": "rewards",
               "terminals": "terminations", "timeouts": "truncations"}


def read_minari(f, path):
    """Minari's layout -> D4RL's five flat arrays. Each episode_N group holds one more observation
    than actions (the one after the last step), which no action follows, so it is dropped."""
    names = sorted((k for k in f if k.startswith("episode_")), key=lambda k: (len(k), k))  # numeric order
    episodes = []
    for name in names:
        where = f"{path}: {name}"
        ep = {ours: read_key(f[name], theirs, where) for ours, theirs in MINARI_KEYS.items()}
        missing = [MINARI_KEYS[k] for k, a in ep.items() if a is None]
        if missing:
            raise DataError(f"{where}: missing key(s) {', '.join(missing)}")
        steps = len(ep["actions"]) if ep["actions"].ndim else 0
        if steps == 0:
            raise DataError(f"{where}: the episode has no steps")
        if len(ep["observations"]) not in (steps, steps + 1):
            raise DataError(f"{where}: key 'observations' has {len(ep['observations'])} rows for {steps} actions")
        ep["observations"] = ep["observations"][:steps]
        check_arrays(ep, where)
        ep["timeouts"] = ep["timeouts"].astype(bool)
        ep["timeouts"][-1] |= not ep["terminals"][-1]  # an episode ends at its last step, flagged or not
        if episodes and any(ep[k].shape[1:] != episodes[0][k].shape[1:] for k in ep):
            raise DataError(f"{where}: its arrays are not the same width as {names[0]}'s")
        episodes.append(ep)
    return {k: np.concatenate([ep[k] for ep in episodes]) for k in REQUIRED_KEYS}


def minari_env_id(f):
    """The env id Minari records as JSON in the root attribute env_spec (None if absent)."""
    try:
        return json.loads(f.attrs["env_spec"])["id"]
    except Exception:  # absent or unreadable: the user can still pass --env
        return None


def read_hdf5(path):
    """Read and check the five D4RL arrays; any other key is ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except Exception as e:  # OSError for anything that is not (intact) HDF5
        raise DataError(f"{path}: cannot be read as HDF5 ({one_line(e)})") from None
    with f:
        try:
            minari = "observations" not in f and any(k.startswith("episode_") for k in f)
        except Exception as e:
            raise DataError(f"{path}: the file is damaged ({one_line(e)})") from None
        if minari:
            return read_minari(f, path), minari_env_id(f)
        arrays = {k: read_key(f, k, path) for k in REQUIRED_KEYS}
        try:
            env_attr = f.attrs.get("env")
        except Exception:  # a damaged attribute only costs us the env name, which --env can give
            env_attr = None
    missing = [k for k, a in arrays.items() if a is None]
    if missing:
        raise DataError(f"{path}: not a D4RL trajectory file, missing key(s) {', '.join(missing)}")
    check_arrays(arrays, path)
    if isinstance(env_attr, bytes):
        env_attr = env_attr.decode(errors="replace")
    return arrays, env_attr if isinstance(env_attr, str) else None


def episode_ends(terminals, timeouts):
    """Boolean (N,) array, True on the last step of each episode. A trailing episode that was cut
    off without either flag (a partial last episode) still ends at the last row."""
    ends = np.asarray(terminals, bool) | np.asarray(timeouts, bool)
    ends[-1] = True
    return ends


def returns_to_go(rewards, ends, gamma=1.0):
    """R_t = r_t + gamma * R_{t+1} inside each episode, restarting at every episode end.

    gamma=1 (the DT paper) makes R_t the reward still to be collected, which is what a user asks
    for at test time; gamma<1 is the discounted variant the seed experimented with."""
    rewards, ends = np.asarray(rewards, np.float64).tolist(), np.asarray(ends).tolist()
    out = [0.0] * len(rewards)
    running = 0.0
    for i in range(len(rewards) - 1, -1, -1):  # one pass at load time, not in the training loop
        if ends[i]:
            running = 0.0
        running = rewards[i] + gamma * running
        out[i] = running
    return np.array(out)


def episode_bounds(ends):
    """First and last flat index of every episode, from the episode_ends array."""
    last = np.flatnonzero(ends)
    return np.concatenate(([0], last[:-1] + 1)), last


def episode_totals(rewards, ends):
    """Each episode's undiscounted return, summed in float64."""
    return np.add.reduceat(np.asarray(rewards, np.float64), episode_bounds(ends)[0])


def keep_best_episodes(arrays, ends, top_pct):
    """Only the episodes whose return is among the best `top_pct` percent (at least one): the
    data of "X% BC", behaviour cloning on the best trajectories. Order in the file is kept."""
    first, last = episode_bounds(ends)
    returns = episode_totals(arrays["rewards"], ends)
    n_keep = max(1, round(len(returns) * top_pct / 100))
    keep = np.zeros(len(returns), bool)
    keep[np.argsort(-returns, kind="stable")[:n_keep]] = True  # ties: the earlier episode wins
    rows = np.repeat(keep, last - first + 1)
    return {k: a[rows] for k, a in arrays.items()}, ends[rows]


def delay_rewards(rewards, ends):
    """Every reward of an episode moved to its last step, the sum unchanged (the DT paper's
    delayed-return test). The return-to-go is then the episode's whole return at every one of its
    steps: it still tells a good episode from a bad one, but no step from the next, which is
    the step-by-step signal that value-based RL propagates with Bellman backups."""
    delayed = np.zeros(len(rewards))
    delayed[episode_bounds(ends)[1]] = episode_totals(rewards, ends)
    return delayed


def load_trajectories(path, gamma=1.0, reward_scale=REWARD_SCALE, reward_mode="dense", top_pct=100.0):
    """Read a file into Trajectories. `top_pct` < 100 keeps only the best episodes (and takes the
    state statistics from them); reward_mode "delayed" trains on delay_rewards' returns-to-go.
    Whatever the mode, episode_returns are the true (dense) returns."""
    arrays, env_attr = read_hdf5(path)
    ends = episode_ends(arrays["terminals"], arrays["timeouts"])
    episodes_in_file = int(ends.sum())
    if top_pct < 100:
        arrays, ends = keep_best_episodes(arrays, ends, top_pct)
    rewards = delay_rewards(arrays["rewards"], ends) if reward_mode == "delayed" else arrays["rewards"]
    obs = arrays["observations"].astype(np.float32)
    start_idx, end_idx = episode_bounds(ends)
    episode_start = np.repeat(start_idx, end_idx - start_idx + 1)

    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, once
        mean = obs.mean(0)
        std = obs.std(0) + 1e-6  # floor: a constant observation dimension would divide by zero
        states = (obs - mean) / std
        rtg = (returns_to_go(rewards, ends, gamma) / reward_scale).astype(np.float32)
        actions = arrays["actions"].astype(np.float32)
    for key, a in (("observations", states), ("observations", std), ("rewards", rtg), ("actions", actions)):
        if not np.isfinite(a).all():  # finite in the file, but beyond float32 once summed or squared
            raise DataError(f"{path}: key '{key}' has values too large to train on")
    episode_returns = episode_totals(arrays["rewards"], ends)
    data = Trajectories(
        states=torch.from_numpy(states),
        actions=torch.from_numpy(actions),
        returns_to_go=torch.from_numpy(rtg),
        timesteps=torch.from_numpy(np.arange(len(obs)) - episode_start),
        episode_start=torch.from_numpy(episode_start),
        episode_returns=episode_returns,
        episodes_in_file=episodes_in_file,
        state_mean=torch.from_numpy(mean),
        state_std=torch.from_numpy(std),
        reward_scale=reward_scale,
    )
    return data, env_attr or env_id_for(path)


def sample_batch(data, batch_size, context_len, generator=None):
    """A batch of K-step windows, each ending at a uniformly drawn step of the whole dataset.

    Drawing the *last* step uniformly over all N steps is the same as picking a trajectory with
    probability proportional to its length and then a step inside it (the seed's "augmented"
    sample distribution), without any per-trajectory bookkeeping. Windows that would reach back
    before their episode's first step are left-padded (zeros, mask False), just like the short
    histories at the start of an evaluation episode.
    """
    device = data.states.device
    last = torch.randint(0, data.num_steps, (batch_size,), device=device, generator=generator)
    idx = last[:, None] + torch.arange(1 - context_len, 1, device=device)  # (B, K)
    mask = idx >= data.episode_start[last][:, None]
    idx = torch.where(mask, idx, last[:, None])  # any valid row will do; it is zeroed below
    m = mask[..., None]
    return (
        data.states[idx] * m,
        data.actions[idx] * m,
        (data.returns_to_go[idx] * mask)[..., None],
        data.timesteps[idx] * mask,
        mask,
    )
