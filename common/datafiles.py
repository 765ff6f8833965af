"""
Reading trajectory files, checked on the way in: D4RL's flat HDF5 layout, Minari's (one group per
episode, in a dataset folder with its metadata.json), and the Parquet files of the Hugging Face
dataset edbeeching/decision_transformer_gym_replay (one row per trajectory). A data file is
untrusted input: every way it can be wrong (a missing key, mismatched lengths, a wrong shape or
type, NaN, a damaged file) ends in one DataError naming the file, the key and the problem, never in
a traceback from deep inside training. Nothing is ever unpickled.

read_file(path) -> ({key: array} with D4RL's five keys, {attribute: value} describing the evaluation:
"env" (an env id), or a maze's "eval_env_spec", "ref_min_score" and "ref_max_score"; tasks.py reads it)
"""
import json
from pathlib import Path

import h5py
import numpy as np

from common.tasks import GOAL_RADIUS, maze_goal

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


class DataError(Exception):
    """A data file that cannot be used; the message names the file and the problem."""


def read_file(path):
    """Any trajectory file or folder this project reads -> (D4RL's arrays, its evaluation attributes)."""
    path = Path(path)
    if path.is_dir():
        for minari_file in (path / "data" / "main_data.hdf5", path / "main_data.hdf5"):  # a Minari dataset
            if minari_file.is_file():
                return read_hdf5(minari_file)
        if any(path.glob("*.parquet")):
            return read_parquet(path)
        raise DataError(f"{path}: is a folder without trajectories; expected a D4RL .hdf5 file, a Minari "
                        f"dataset folder (holding data/main_data.hdf5) or a folder of Parquet files")
    if path.suffix == ".parquet":
        return read_parquet(path)
    return read_hdf5(path)


def read_hdf5(path):
    """Read and check the five D4RL arrays (and next_observations when present); any other key is
    ignored."""
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
            attrs = minari_attributes(f, path)
            return read_minari(f, path, attrs.get("relabel_goal")), attrs
        arrays = {k: read_key(f, k, path) for k in REQUIRED_KEYS}
        next_obs = read_key(f, "next_observations", path)  # optional: IQL's s' where an episode is cut
        attrs = read_attributes(f)
    missing = [k for k, a in arrays.items() if a is None]
    if missing:
        raise DataError(f"{path}: not a D4RL trajectory file, missing key(s) {', '.join(missing)}")
    if next_obs is not None:
        arrays["next_observations"] = next_obs
    check_arrays(arrays, path)
    return arrays, attrs


EVALUATION_ATTRIBUTES = ("env", "eval_env_spec", "ref_min_score", "ref_max_score")


def read_attributes(f):
    """The root attributes that describe the evaluation, those that are there and readable: a
    damaged one is left out, and tasks.py says what is missing."""
    attrs = {}
    for name in EVALUATION_ATTRIBUTES:
        try:
            value = f.attrs[name]
        except Exception:
            continue
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if isinstance(value, np.generic):
            value = value.item()
        attrs[name] = value
    return attrs


def one_line(error):
    text = str(error).strip().strip("'\"").splitlines()
    return text[0] if text else "no details given"


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
    nxt = arrays.get("next_observations")
    if nxt is not None and nxt.shape[1:] != arrays["observations"].shape[1:]:
        raise DataError(f"{path}: key 'next_observations' has shape {nxt.shape}, expected (steps, "
                        f"{arrays['observations'].shape[1]}) like 'observations'")
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


def read_minari(f, path, goal=None):
    """Minari's layout -> D4RL's five flat arrays, and next_observations when every episode has
    them. Each episode_N group holds one more observation than actions (the one after the last
    step): it is that step's next observation, and no action follows it. A dict observation (a
    maze's) gives its "observation" part; with a `goal` (x, y), the rewards are relabelled against
    it (relabelled_rewards)."""
    names = sorted((k for k in f if k.startswith("episode_")), key=lambda k: (len(k), k))  # numeric order
    episodes = []
    for name in names:
        where = f"{path}: {name}"
        keys = dict(MINARI_KEYS)
        if has_dict_observations(f, name):
            keys["observations"] = "observations/observation"
        ep = {ours: read_key(f[name], theirs, where) for ours, theirs in keys.items()}
        missing = [keys[k] for k, a in ep.items() if a is None]
        if missing:
            raise DataError(f"{where}: missing key(s) {', '.join(missing)}")
        steps = len(ep["actions"]) if ep["actions"].ndim else 0
        if steps == 0:
            raise DataError(f"{where}: the episode has no steps")
        if goal is not None:
            achieved = read_key(f[name], "observations/achieved_goal", where)
            ep["rewards"] = relabelled_rewards(achieved, steps, goal, where)
        if len(ep["observations"]) not in (steps, steps + 1):
            raise DataError(f"{where}: key 'observations' has {len(ep['observations'])} rows for {steps} actions")
        if len(ep["observations"]) == steps + 1:
            ep["next_observations"] = ep["observations"][1:]
        ep["observations"] = ep["observations"][:steps]
        check_arrays(ep, where)
        ep["timeouts"] = ep["timeouts"].astype(bool)
        ep["timeouts"][-1] |= not ep["terminals"][-1]  # an episode ends at its last step, flagged or not
        if episodes and any(ep[k].shape[1:] != episodes[0][k].shape[1:] for k in REQUIRED_KEYS):
            raise DataError(f"{where}: its arrays are not the same width as {names[0]}'s")
        episodes.append(ep)
    keys = [*REQUIRED_KEYS, *(["next_observations"] if all("next_observations" in ep for ep in episodes) else [])]
    return {k: np.concatenate([ep[k] for ep in episodes]) for k in keys}


def has_dict_observations(f, episode):
    try:
        return isinstance(f[episode].get("observations"), h5py.Group)
    except Exception:
        return False


def relabelled_rewards(achieved, steps, goal, where):
    """1 for every step whose next position is within GOAL_RADIUS of `goal`, else 0: the sparse
    reward of D4RL's maze2d files, against the one evaluation goal instead of the random goals the
    data's planner pursued (which Minari's rewards are for). `achieved`: the positions before and
    after each step, (steps + 1, 2)."""
    if achieved is None or achieved.shape != (steps + 1, 2):
        raise DataError(f"{where}: key 'observations/achieved_goal' must hold the {steps + 1} positions "
                        f"of its {steps} steps to relabel the rewards against the evaluation goal")
    return (np.linalg.norm(achieved[1:] - np.asarray(goal), axis=1) <= GOAL_RADIUS).astype(np.float32)


def minari_attributes(f, path):
    """The env id a Minari dataset records: in metadata.json beside main_data.hdf5 (Minari 0.5), or
    in the file's root attribute env_spec (older files); {} if neither says (--env can). A maze
    dataset (dict observations, an eval_env_spec whose maze has a goal cell "g", reference scores)
    is read as D4RL's fixed-goal task: its evaluation, and the goal to relabel the rewards against."""
    try:
        metadata = json.loads(Path(path).with_name("metadata.json").read_text())
        attrs = {"env": json.loads(metadata["env_spec"])["id"]}
    except Exception:  # no metadata.json, or not Minari's: the attribute may still say
        metadata, attrs = None, None
    if attrs:
        try:
            spec = json.loads(metadata["eval_env_spec"])
            goal = maze_goal(spec["kwargs"])
            ref = {k: float(metadata[k]) for k in ("ref_min_score", "ref_max_score")}
        except Exception:  # not a maze with a fixed goal: the env id is all it says
            return attrs
        if goal is not None and has_dict_observations(f, "episode_0"):
            attrs.update(ref, relabel_goal=goal, eval_env_spec=json.dumps(
                {"id": spec["id"], "kwargs": spec["kwargs"], "max_episode_steps": spec.get("max_episode_steps"),
                 "observation_key": "observation"}))
        return attrs
    try:
        return {"env": json.loads(f.attrs["env_spec"])["id"]}
    except Exception:
        return {}


PARQUET_COLUMNS = ("observations", "actions", "rewards", "dones")


def read_parquet(path):
    """The Hugging Face Decision Transformer dataset's layout: one row per trajectory, each column a
    list over its steps (observations and actions lists of vectors). `dones` marks where the MDP
    ended; a row that ends without it was cut by the time limit. A folder reads all its .parquet
    files in name order."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow, which is optional: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # ArrowInvalid, OSError, ... for anything that is not (intact) Parquet
        raise DataError(f"{path}: cannot be read as Parquet ({one_line(e)})") from None
    missing = [c for c in PARQUET_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: not a trajectory table, missing column(s) {', '.join(missing)}")
    columns = {c: parquet_steps(table.column(c), c, path) for c in PARQUET_COLUMNS}
    lengths = columns["observations"][1]
    for c, (_, n) in columns.items():
        if not np.array_equal(n, lengths):
            row = int(np.flatnonzero(n != lengths)[0])
            raise DataError(f"{path}: row {row}: column '{c}' has {n[row]} steps but 'observations' has {lengths[row]}")
    if lengths.min() == 0:
        raise DataError(f"{path}: row {int(np.argmin(lengths))} has no steps")
    dones = columns["dones"][0].astype(bool)
    timeouts = np.zeros(len(dones), bool)
    last = np.cumsum(lengths) - 1
    timeouts[last] = ~dones[last]  # every row is one whole episode
    arrays = {"observations": columns["observations"][0], "actions": columns["actions"][0],
              "rewards": columns["rewards"][0], "terminals": dones, "timeouts": timeouts}
    check_arrays(arrays, path)
    return arrays, {}


def parquet_steps(column, name, path):
    """A list column -> (its steps stacked: (N,) or (N, width), steps per row (rows,))."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        column = column.combine_chunks()
        if not pa.types.is_list(column.type) or column.null_count:
            raise ValueError("not one list per row")
        steps = column.flatten()
        if pa.types.is_list(steps.type):  # vectors: every step the same width
            widths = pc.list_value_length(steps).to_numpy(zero_copy_only=False)
            if steps.null_count or len(widths) and (widths != widths[0]).any():
                raise ValueError("vectors of different widths")
            values = steps.flatten().to_numpy(zero_copy_only=False).reshape(len(steps), -1)
        else:
            values = steps.to_numpy(zero_copy_only=False)
        if values.dtype.kind not in "biuf":
            raise ValueError(f"{values.dtype} values, not numbers")
        return values, pc.list_value_length(column).to_numpy(zero_copy_only=False)
    except (ValueError, TypeError, pa.ArrowException) as e:
        raise DataError(f"{path}: column '{name}' is not a list of steps per row ({one_line(e)})") from None
