"""
What a dataset is evaluated in: its environment (id, settings, horizon, and which part of a dict
observation the policy sees) and the reference returns that turn a return into D4RL's normalized
score, 100 * (R - random) / (expert - random).

A locomotion file names only its body (in its file name or its `env` attribute), and everything
else is D4RL's. A maze file carries its whole evaluation in its attributes: `eval_env_spec` (JSON:
id, kwargs, max_episode_steps, observation_key) and `ref_min_score` / `ref_max_score`, the way
Minari's datasets do. Mazes need the optional gymnasium-robotics package, imported only for them.
"""
import contextlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# D4RL's reference returns (d4rl/infos.py): a random policy and the expert.
D4RL_REF_RETURNS = {
    "HalfCheetah": (-280.178953, 12135.0),
    "Hopper": (-20.272305, 3234.3),
    "Walker2d": (1.629008, 4592.3),
}
# Return asked for when no --target is given: the DT paper's, a little above the best episodes
# in D4RL's expert data.
DEFAULT_TARGETS = {"HalfCheetah": 12000.0, "Hopper": 3600.0, "Walker2d": 5000.0}
# Which environment a D4RL file belongs to, from its name (halfcheetah-expert-v2.hdf5). D4RL's v2
# data came from the old mujoco-py v2 envs, which gymnasium no longer ships; v5 has the same
# bodies, observations and rewards.
ENV_IDS = {"halfcheetah": "HalfCheetah-v5", "hopper": "Hopper-v5", "walker2d": "Walker2d-v5"}
# Environments of gymnasium-robotics (registered when it is imported), by id prefix.
ROBOTICS_PREFIXES = ("PointMaze", "AntMaze")
# A maze pays its sparse reward within this distance of the goal: PointMaze's own success radius.
GOAL_RADIUS = 0.45


class TaskError(Exception):
    """An evaluation environment that cannot be made; the message says which and why."""


@dataclass
class Task:
    env_id: str
    env_kwargs: dict = field(default_factory=dict)
    max_episode_steps: int = None  # None: the horizon the env registered
    observation_key: str = None    # dict observations: the part the policy sees
    ref_returns: tuple = None      # (random, expert) returns of the normalized score
    # Rewards of 0 or 1 per step (the mazes), so returns of tens to hundreds, not thousands: the
    # reward scales of data.py follow from it.
    sparse: bool = False

    @property
    def body(self):
        return self.env_id.split("-")[0]

    def normalized_score(self, ret):
        low, high = self.ref_returns
        return 100.0 * (ret - low) / (high - low)

    @property
    def default_target(self):
        """The DT paper's target for a body; for a maze, the reference maximum: what the noise-free
        planner earns, the most the evaluation pays for."""
        return self.ref_returns[1] if self.sparse else DEFAULT_TARGETS.get(self.body, 0.0)

    def to_dict(self):
        """Plain values only, for a checkpoint that loads with weights_only=True."""
        return {**asdict(self), "ref_returns": list(self.ref_returns) if self.ref_returns else None}


def locomotion_task(env_id):
    return Task(env_id, ref_returns=D4RL_REF_RETURNS.get(env_id.split("-")[0]))


def task_for_name(path):
    """Guess the locomotion task from a dataset's name: the file's, else one of its two nearest
    folders' (halfcheetah-expert-v2/train/0000.parquet), not anything further up the path, which
    names the user's folders rather than the data. None when none starts with a body."""
    path = Path(path)
    for name in (p.name.lower() for p in (path, path.parent, path.parent.parent)):
        for body, env_id in ENV_IDS.items():
            if name.startswith(body):
                return locomotion_task(env_id)
    return None


def task_from_checkpoint(ckpt):
    """A checkpoint's task; one written before tasks were recorded names its env id alone."""
    if "task" not in ckpt:
        return locomotion_task(ckpt["env_id"])
    task = dict(ckpt["task"])
    return Task(**{**task, "ref_returns": tuple(task["ref_returns"]) if task["ref_returns"] else None})


def task_from_attributes(attrs, where):
    """A file's own description of its evaluation -> Task, or None when it has none. Anything wrong
    in it is one TaskError naming the file and the attribute."""
    if "eval_env_spec" not in attrs:
        return locomotion_task(attrs["env"]) if attrs.get("env") else None
    try:
        spec = json.loads(attrs["eval_env_spec"])
    except (TypeError, ValueError):
        raise TaskError(f"{where}: attribute 'eval_env_spec' is not JSON") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("id"), str):
        raise TaskError(f"{where}: attribute 'eval_env_spec' names no environment id")
    kwargs, horizon = spec.get("kwargs") or {}, spec.get("max_episode_steps")
    key = spec.get("observation_key")
    if not isinstance(kwargs, dict) or not (horizon is None or isinstance(horizon, int) and horizon > 0):
        raise TaskError(f"{where}: attribute 'eval_env_spec' needs kwargs as an object and "
                        f"max_episode_steps as a positive whole number")
    try:
        ref = (float(attrs["ref_min_score"]), float(attrs["ref_max_score"]))
    except (KeyError, TypeError, ValueError):
        raise TaskError(f"{where}: needs numeric attributes 'ref_min_score' and 'ref_max_score' beside "
                        f"'eval_env_spec' (the returns that normalize its scores)") from None
    if not ref[1] > ref[0]:
        raise TaskError(f"{where}: 'ref_max_score' ({ref[1]:g}) must be above 'ref_min_score' ({ref[0]:g})")
    task = Task(spec["id"], kwargs, horizon, key if isinstance(key, str) else None, ref,
                sparse=kwargs.get("reward_type") == "sparse")
    check_task(task, where)
    return task


def maze_goal(kwargs):
    """The (x, y) centre of the goal cell "g" of a maze's maze_map, None when it has none.
    gymnasium-robotics puts the maze's centre at the origin, x to the right along a row and y up:
    x = (col + 0.5 - width / 2) * scale, y = (height / 2 - row - 0.5) * scale."""
    rows = kwargs.get("maze_map") or []
    scale = kwargs.get("maze_size_scaling", 1.0)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            if cell == "g":
                return [(c + 0.5 - len(row) / 2) * scale, (len(rows) / 2 - r - 0.5) * scale]
    return None


def import_gym(env_id):
    """gymnasium, with gymnasium-robotics' environments registered when `env_id` is one of them."""
    import gymnasium as gym

    if env_id.startswith(ROBOTICS_PREFIXES):
        try:
            # Its import prints a notice about its Adroit hand envs' rewards to stderr, which
            # concerns none of the envs used here.
            with contextlib.redirect_stderr(io.StringIO()):
                import gymnasium_robotics
        except ImportError:
            raise TaskError(f"{env_id} needs the optional package gymnasium-robotics: "
                            f"pip install gymnasium-robotics") from None
        gym.register_envs(gymnasium_robotics)
    return gym


def check_task(task, where):
    """Make the env once: an unknown id, settings it refuses, or an observation key its observations
    lack are found when the data is loaded, not after training."""
    gym = import_gym(task.env_id)
    try:
        env = gym.make(task.env_id, **task.env_kwargs)
    except gym.error.Error as e:
        raise TaskError(f"{where}: cannot make environment {task.env_id!r}: {e}") from None
    except Exception as e:  # settings the env's constructor refuses (a bad maze_map, an unknown kwarg)
        raise TaskError(f"{where}: environment {task.env_id!r} refuses its kwargs ({type(e).__name__}: {e})") from None
    space = env.observation_space
    env.close()
    keys = list(getattr(space, "spaces", {}))
    if keys and task.observation_key not in keys:
        raise TaskError(f"{where}: {task.env_id} observes a dict ({', '.join(keys)}), and the "
                        f"observation_key {task.observation_key!r} is not one of them")
    if not keys and task.observation_key:
        raise TaskError(f"{where}: {task.env_id} observes an array, so it has no part "
                        f"{task.observation_key!r}")
