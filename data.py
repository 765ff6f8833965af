"""
Trajectory data: a D4RL-style file -> normalized states, returns-to-go and batches of windows.

D4RL stores every episode back to back in flat arrays (`observations`, `actions`, `rewards`,
`terminals`, `timeouts`); an episode ends where `terminals` (the MDP ended) or `timeouts` (the time
limit cut it) is true. common/datafiles.py reads and checks the files; this file turns the arrays
into what the DT trains on, read once into contiguous tensors, so that a batch is a handful of
vectorised index operations, with no Python loop per sample.
"""
from dataclasses import dataclass

import numpy as np
import torch

from common.datafiles import DataError, read_file
from common.tasks import TaskError, task_for_name, task_from_attributes

# The DT divides returns-to-go by a scale so that its return input is O(1)-O(10). The DT paper
# uses 1000 for the MuJoCo bodies, whose returns are thousands. A sparse maze pays 1 per step
# near its goal: returns of tens in the data and up to a few hundred in the evaluation, so 100.
REWARD_SCALE = 1000.0
SPARSE_REWARD_SCALE = 100.0


@dataclass
class Normalization:
    """How training saw the data, which every rollout must repeat: the state statistics, the
    return scale, whether the rewards were delayed, and a TT's bins. A checkpoint stores them."""
    state_mean: torch.Tensor  # (S,)
    state_std: torch.Tensor   # (S,)
    reward_scale: float
    reward_mode: str = "dense"
    bins: torch.Tensor = None  # (N + 1, D) the Trajectory Transformer's bin edges (tt.Discretizer)

    def states(self, obs):
        """(B, S) raw observations -> the normalized states the model was trained on."""
        return (obs - self.state_mean) / self.state_std

    def return_to_go(self, target, collected):
        """The return-to-go input at test time, per episode: the target minus the reward each
        episode has collected, counting down as the training data's returns-to-go did. A model
        trained on delayed rewards saw the episode's whole return at every step, so it is given
        the target unchanged, as in the DT paper's delayed-return evaluation."""
        left = target if self.reward_mode == "delayed" else target - collected
        return left / self.reward_scale

    def to(self, device):
        return Normalization(self.state_mean.to(device), self.state_std.to(device), self.reward_scale,
                             self.reward_mode, None if self.bins is None else self.bins.to(device))


@dataclass
class Trajectories:
    states: torch.Tensor         # (N, S) float32, normalized with norm.state_mean/state_std
    actions: torch.Tensor        # (N, A) float32
    returns_to_go: torch.Tensor  # (N,) float32, divided by norm.reward_scale
    timesteps: torch.Tensor      # (N,) int64, step index inside its episode
    episode_start: torch.Tensor  # (N,) int64, flat index of the first step of the step's episode
    episode_returns: np.ndarray  # (E,) float64, undiscounted, unscaled, true (dense) rewards
    episodes_in_file: int        # E before keeping only the best episodes
    norm: Normalization
    rewards: torch.Tensor        # (N,) float32, the rewards as trained on (dense or delayed), unscaled
    terminals: torch.Tensor      # (N,) bool, where the MDP truly ended (a body fell), whatever the mode
    sparse: bool = False         # a maze's 0/1 rewards, not a body's
    final_next_states: torch.Tensor = None  # (E, S) normalized s' after each episode's last step, from the file
    relabelled_goal: list = None  # the (x, y) a Minari maze's rewards were relabelled against

    @property
    def num_steps(self):
        return self.states.shape[0]

    @property
    def state_dim(self):
        return self.states.shape[1]

    @property
    def act_dim(self):
        return self.actions.shape[1]

    def episode_ends(self):
        """(N,) bool tensor, True on the last step of each episode."""
        start = self.episode_start
        return torch.cat((start[1:] != start[:-1], torch.ones(1, dtype=torch.bool, device=start.device)))

    def to(self, device):
        for name in ("states", "actions", "returns_to_go", "timesteps", "episode_start", "rewards", "terminals",
                     "final_next_states"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self


def returns_to_go(rewards, ends, gamma=1.0):
    """R_t = r_t + gamma * R_{t+1} inside each episode, restarting at every episode end.

    gamma=1 (the DT paper) makes R_t the reward still to be collected, which is what a user asks
    for at test time; gamma<1 gives the discounted variant."""
    rewards, ends = np.asarray(rewards, np.float64).tolist(), np.asarray(ends).tolist()
    out = [0.0] * len(rewards)
    running = 0.0
    for i in range(len(rewards) - 1, -1, -1):  # one pass at load time, not in the training loop
        if ends[i]:
            running = 0.0
        running = rewards[i] + gamma * running
        out[i] = running
    return np.array(out)


def episode_ends(terminals, timeouts):
    """Boolean (N,) array, True on the last step of each episode. A trailing episode that was cut
    off without either flag (a partial last episode) still ends at the last row."""
    ends = np.asarray(terminals, bool) | np.asarray(timeouts, bool)
    ends[-1] = True
    return ends


def episode_bounds(ends):
    """First and last flat index of every episode, from the episode_ends array."""
    last = np.flatnonzero(ends)
    return np.concatenate(([0], last[:-1] + 1)), last


def episode_totals(rewards, ends):
    """Each episode's undiscounted return, summed in float64."""
    return np.add.reduceat(np.asarray(rewards, np.float64), episode_bounds(ends)[0])


def delay_rewards(rewards, ends):
    """Every reward of an episode moved to its last step, the sum unchanged (the DT paper's
    delayed-return test). The return-to-go is then the episode's whole return at every one of its
    steps: it still tells a good episode from a bad one, but no step from the next, which is
    the step-by-step signal that value-based RL propagates with Bellman backups."""
    delayed = np.zeros(len(rewards))
    delayed[episode_bounds(ends)[1]] = episode_totals(rewards, ends)
    return delayed


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


def load_trajectories(path, gamma=1.0, reward_mode="dense", top_pct=100.0):
    """Read a file into (Trajectories, tasks.Task or None when the file does not say). `top_pct`
    < 100 keeps only the best episodes (and takes the state statistics from them); reward_mode
    "delayed" trains on delay_rewards' returns-to-go (and rewards). Whatever the mode,
    episode_returns are the true (dense) returns."""
    arrays, attrs = read_file(path)
    try:
        task = task_from_attributes(attrs, path) or task_for_name(path)
    except TaskError as e:
        raise DataError(str(e)) from None
    sparse = task is not None and task.sparse
    reward_scale = SPARSE_REWARD_SCALE if sparse else REWARD_SCALE
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
    data = Trajectories(
        states=torch.from_numpy(states),
        actions=torch.from_numpy(actions),
        returns_to_go=torch.from_numpy(rtg),
        timesteps=torch.from_numpy(np.arange(len(obs)) - episode_start),
        episode_start=torch.from_numpy(episode_start),
        episode_returns=episode_totals(arrays["rewards"], ends),
        episodes_in_file=episodes_in_file,
        norm=Normalization(torch.from_numpy(mean), torch.from_numpy(std), reward_scale, reward_mode),
        rewards=torch.from_numpy(np.array(rewards, np.float32)),
        terminals=torch.from_numpy(arrays["terminals"].astype(bool)),
        sparse=sparse,
        relabelled_goal=attrs.get("relabel_goal"),
    )
    if "next_observations" in arrays:  # only the episodes' last rows: the others' s' is the next row
        data.final_next_states = torch.tensor((arrays["next_observations"][end_idx] - mean) / std, dtype=torch.float32)
    return data, task


def sample_batch(data, batch_size, context_len, generator=None):
    """A batch of K-step windows, each ending at a uniformly drawn step of the whole dataset.

    Drawing the *last* step uniformly over all N steps is the same as picking a trajectory with
    probability proportional to its length and then a step inside it (the DT reference code's
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
