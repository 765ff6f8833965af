"""Tests of the sparse-reward mazes: a data file that names its own evaluation (tasks.py), the
environment made from it (vecenv.py), and Minari's pointmaze datasets relabelled against the
evaluation goal (datafiles.py)."""
import json
import sys

import h5py
import numpy as np
import pytest
import torch

import evaluate
import train
from common import rollout, tasks
from common.checkpoint import load_checkpoint
from common.datafiles import DataError
from data import load_trajectories
from methods.plan import PlanSettings
from model import DecisionTransformer, DTConfig
from study import mazes, stats
from tests.helpers import assert_one_line_error, assert_usage_error, mutated_copies, run_cli

pytest.importorskip("gymnasium_robotics", reason="the mazes need the optional package gymnasium-robotics")

# D4RL's U-maze, goal in row 1, column 1: (x, y) = (-1, 1) in gymnasium-robotics' coordinates.
UMAZE = [[1, 1, 1, 1, 1], [1, "g", 0, 0, 1], [1, 1, 1, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
SPEC = {"id": "PointMaze_UMaze-v3", "max_episode_steps": 25, "observation_key": "observation",
        "kwargs": {"maze_map": UMAZE, "continuing_task": True, "reset_target": False, "reward_type": "sparse"}}


def write_maze(path, spec=SPEC, ref=(2.0, 22.0), episodes=12, length=40, seed=0):
    """A random walk through the U-maze's free cells in D4RL's layout, rewarded 1 within 0.45 of the
    goal, with the evaluation in the file's attributes as the shared maze files have it."""
    rng = np.random.default_rng(seed)
    n = episodes * length
    xy = rng.uniform(-1.5, 1.5, (n, 2))
    obs = np.concatenate([xy, rng.normal(size=(n, 2))], axis=1).astype(np.float32)
    timeouts = np.zeros(n, bool)
    timeouts[length - 1::length] = True
    with h5py.File(path, "w") as f:
        f["observations"] = obs
        f["actions"] = np.clip(rng.normal(size=(n, 2)), -1, 1).astype(np.float32)
        f["rewards"] = (np.linalg.norm(xy - [-1.0, 1.0], axis=1) <= 0.45).astype(np.float32)
        f["terminals"] = np.zeros(n, bool)
        f["timeouts"] = timeouts
        f.attrs["eval_env_spec"] = spec if isinstance(spec, str) else json.dumps(spec)
        f.attrs["ref_min_score"], f.attrs["ref_max_score"] = ref
    return path


def test_the_evaluation_comes_from_the_file_and_the_policy_sees_the_observation_part(tmp_path):
    data, task = load_trajectories(write_maze(tmp_path / "maze.hdf5"))
    assert (task.env_id, task.max_episode_steps, task.observation_key, task.ref_returns, task.sparse) == \
        ("PointMaze_UMaze-v3", 25, "observation", (2.0, 22.0), True)
    assert tasks.maze_goal(task.env_kwargs) == [-1.0, 1.0]
    # Sparse rewards get their own scale: the DT's returns-to-go / 100, not / 1000.
    assert data.norm.reward_scale == 100.0
    model = DecisionTransformer(DTConfig(state_dim=4, act_dim=2, context_len=4, n_layer=1, n_embd=16)).eval()
    seen = []
    returns = rollout.rollout(model, data.norm, task, 50.0, 3, progress=False, record=seen).returns
    # The file's horizon, not the env's registered one (300), and (x, y, vx, vy) of each episode.
    assert len(seen) == 25 + 1 and all(o.shape == (3, 4) for o in seen)
    assert returns.shape == (3,) and (returns >= 0).all()


def cell_centre(row, col):
    return col + 0.5 - 2.5, 2.5 - row - 0.5  # the U-maze is 5 x 5 cells


def test_the_stitching_measure_counts_cells_and_episodes_by_hand(tmp_path):
    # Episode A walks from the bottom-left cell round the U to the goal and is paid twice there;
    # episode B dawdles in the bottom row and earns nothing.
    a = [(3, 1), (3, 2), (3, 3), (2, 3), (1, 3), (1, 2), (1, 1), (1, 1)]
    b = [(3, 1), (3, 2), (3, 1)]
    xy = np.array([cell_centre(*cell) for cell in a + b])
    path = tmp_path / "two.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"] = np.concatenate([xy, np.zeros_like(xy)], axis=1).astype(np.float32)
        f["actions"] = np.zeros((len(xy), 2), np.float32)
        f["rewards"] = np.array([0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0], np.float32)
        f["terminals"] = np.zeros(len(xy), bool)
        f["timeouts"] = np.array([0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1], bool)
        f.attrs["eval_env_spec"], f.attrs["ref_min_score"], f.attrs["ref_max_score"] = json.dumps(SPEC), 0.0, 20.0
    m = mazes.stitching(path)
    assert m["free_cells"] == 7 and m["cells_linked_to_goal"] == 1.0
    # Cells (3, 1) and (3, 2): one of their two episodes goes on to the goal; the other five: A's.
    assert m["episodes_that_go_on"] == pytest.approx((0.5 + 0.5 + 5) / 7)
    assert m["best_episode_return"] == 2.0 and m["share_of_reference"] == 0.1


def test_the_maze_pictures_are_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    data = write_maze(tmp_path / "maze.hdf5")
    dt, iql, size = str(tmp_path / "dt.pt"), str(tmp_path / "iql.pt"), ["--batch-size", "8", "--n-layer", "1", "--n-embd", "16"]
    train.main(["--data", str(data), "--max-steps", "2", *size, "--context-len", "4", "--out", dt])
    train.main(["--data", str(data), "--model", "iql", "--max-steps", "2", *size, "--out", iql])
    # A TT's episodes are planned, with evaluate.py's --beam-width and --horizon.
    tt = str(tmp_path / "tt.pt")
    train.main(["--data", str(data), "--model", "tt", "--max-steps", "2", *size, "--n-head", "1", "--out", tt])
    mazes.main(["paths", dt, iql, tt, "--episodes", "2", "--beam-width", "2", "--horizon", "1",
                "--out", str(tmp_path / "p.png")])
    assert mazes.episode_paths(tt, 1, planning=PlanSettings(beam_width=2, horizon=1))[3] == "TT, beam 2, horizon 1"
    assert_usage_error(run_cli("study.mazes", "paths", tt, "--beam-width", "0", "--out", str(tmp_path / "x.png")),
                       "--beam-width must be at least 1")
    mazes.main(["values", iql, "--data", str(data), "--out", str(tmp_path / "v.png")])
    # The max-return DT's predicted return, at rest in each position, is its picture of the same.
    rf = str(tmp_path / "rf.pt")
    train.main(["--data", str(data), "--model", "reinformer", "--max-steps", "2", *size, "--context-len", "4", "--out", rf])
    mazes.main(["values", rf, "--data", str(data), "--episodes", "2", "--out", str(tmp_path / "r.png")])
    model, norm, _ = load_checkpoint(rf)
    states = torch.tensor([[0.5, -0.5, 0.0, 0.0], [-0.5, 0.5, 0.0, 0.0]])
    window = torch.zeros(2, 4, 4)
    window[:, -1] = norm.states(states)
    real = torch.tensor([[False, False, False, True]] * 2)
    want = model.get_return(window, torch.zeros(2, 4, 2), torch.zeros(2, 4, 1), torch.zeros(2, 4, dtype=torch.long), real)
    torch.testing.assert_close(mazes.value_at_rest(model, norm, states), want * norm.reward_scale)
    mazes.main(["targets", dt, "--data", str(data), "--episodes", "2", "--out", str(tmp_path / "t.png")])
    for name in ("p", "v", "r", "t"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_one_line_error(run_cli("study.mazes", "values", dt, "--data", str(data), "--out", str(tmp_path / "x.png")),
                          "predicts no value")


def test_the_normalized_score_uses_the_files_reference_returns():
    task = tasks.Task("PointMaze_UMaze-v3", ref_returns=(7.1, 229.7), sparse=True)
    assert task.normalized_score(229.7) == pytest.approx(100.0)
    assert task.normalized_score(7.1 + (229.7 - 7.1) / 4) == pytest.approx(25.0)
    assert task.default_target == 229.7  # a maze's DT is asked for the reference maximum by default


@pytest.mark.parametrize("model", ["dt", "bc", "iql", "reinformer"])
def test_every_method_trains_and_evaluates_on_a_maze_without_env(tmp_path, model, capsys):
    data, out = write_maze(tmp_path / "maze.hdf5"), tmp_path / f"{model}.pt"
    size = ["--batch-size", "8", "--n-layer", "1", "--n-embd", "16"] + (["--context-len", "4"] if model != "iql" else [])
    train.main(["--data", str(data), "--model", model, "--max-steps", "3", *size, "--out", str(out)]
               + (["--top-pct", "50"] if model == "bc" else []))
    printed = capsys.readouterr().out
    assert "env PointMaze_UMaze-v3" in printed
    assert ("rewards x 1" if model == "iql" else "returns-to-go / 100") in printed  # the maze scales
    evaluate.main([str(out), "--episodes", "2", "--json"])
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["env"] == "PointMaze_UMaze-v3" and result["ref_returns"] == [2.0, 22.0]
    assert result["normalized_score"] == pytest.approx(100 * (result["mean_return"] - 2.0) / 20.0)
    assert result["target"] == (22.0 if model == "dt" else None)  # the reference maximum; the rest ask for none
    _, _, ckpt = load_checkpoint(out)
    assert ckpt["task"]["env_kwargs"]["maze_map"] == UMAZE  # the checkpoint alone evaluates


def test_a_checkpoint_without_a_recorded_task_evaluates_as_before(tmp_path, trained):
    old = torch.load(trained, weights_only=True)
    del old["task"]  # as train.py wrote them before tasks were recorded
    torch.save(old, tmp_path / "old.pt")
    proc = run_cli("evaluate.py", str(tmp_path / "old.pt"), "--episodes", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["env"] == "HalfCheetah-v5"


@pytest.mark.parametrize("spec, words", [
    ("{not json", "'eval_env_spec' is not JSON"),
    (dict(SPEC, id="PointMaze_Nowhere-v3"), "cannot make environment 'PointMaze_Nowhere-v3'"),
    (dict(SPEC, observation_key="pixels"), "observation_key 'pixels' is not one of them"),
    (dict(SPEC, max_episode_steps=-5), "max_episode_steps as a positive whole number"),
])
def test_a_bad_eval_env_spec_is_one_line(tmp_path, spec, words):
    path = write_maze(tmp_path / "bad.hdf5", spec=spec)
    with pytest.raises(DataError, match=words) as e:
        load_trajectories(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert_one_line_error(run_cli("train.py", "--data", str(path), "--max-steps", "1"), str(path))


def test_missing_gymnasium_robotics_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium_robotics", None)  # import now fails
    with pytest.raises(DataError, match="needs the optional package gymnasium-robotics: pip install gymnasium-robotics"):
        load_trajectories(write_maze(tmp_path / "maze.hdf5"))


def test_mutated_maze_files_load_or_fail_with_one_line(tmp_path):
    """The mutated-file test's bytes, cut short and flipped, on a maze file: its attributes (the
    JSON of its evaluation, the reference returns) are as untrusted as its arrays."""
    base = write_maze(tmp_path / "base.hdf5", episodes=3, length=20)
    files = mutated_copies(base.read_bytes(), tmp_path / "maze", ".hdf5", np.random.default_rng(1), flips=60)
    loaded = 0
    for path in files:
        try:
            load_trajectories(path)
            loaded += 1
        except DataError as e:
            assert str(path) in str(e) and "\n" not in str(e), str(e)
    assert 0 < loaded < len(files)


def test_a_minari_pointmaze_dataset_trains_the_fixed_goal_task(tmp_path, monkeypatch, capsys):
    """A dataset written by minari itself the way Minari's D4RL/pointmaze sets are: dict observations,
    rewards for the planner's own goals, episodes cut where they were reached, the fixed-goal task in
    its eval_env_spec. Read as D4RL's task: the "observation" part, rewards relabelled against the
    evaluation goal (-1, 1), its reference returns."""
    minari = pytest.importorskip("minari")
    import gymnasium as gym
    from minari.data_collector.episode_buffer import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    free = [[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 1, 1, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
    env = gym.make("PointMaze_UMaze-v3", maze_map=free, continuing_task=True, reset_target=True)
    eval_env = gym.make("PointMaze_UMaze-v3", maze_map=UMAZE, continuing_task=True, reset_target=False,
                        reward_type="sparse", max_episode_steps=25)
    # Episode 0 walks onto the evaluation goal and off it; episode 1 stays far away.
    path0 = np.array([[0.0, 1.0], [-0.8, 1.0], [-1.0, 1.1], [-0.3, 1.0]])
    path1 = np.array([[1.0, -1.0], [0.9, -1.0], [0.8, -1.0]])
    episodes = []
    for path in (path0, path1):
        n = len(path) - 1
        obs = {"observation": np.concatenate([path, np.zeros_like(path)], axis=1), "achieved_goal": path,
               "desired_goal": np.tile(path[-1], (n + 1, 1))}
        episodes.append(EpisodeBuffer(observations=obs, actions=np.zeros((n, 2), np.float32),
                                      rewards=np.r_[np.zeros(n - 1), 1.0], terminations=np.zeros(n, bool),
                                      truncations=np.r_[np.zeros(n - 1, bool), True], infos={}))
    minari.create_dataset_from_buffers("pointmaze/tiny-v0", buffer=episodes, env=env, eval_env=eval_env,
                                       algorithm_name="test", ref_min_score=1.0, ref_max_score=20.0,
                                       author="nanoDT's tests", author_email="none", code_permalink="none",
                                       description="two hand-made episodes")
    data, task = load_trajectories(tmp_path / "datasets" / "pointmaze" / "tiny-v0")
    assert data.state_dim == 4 and task.observation_key == "observation" and task.ref_returns == (1.0, 20.0)
    assert data.relabelled_goal == [-1.0, 1.0]
    # By hand: episode 0's steps lead to (-0.8, 1), 0.2 from the goal; (-1, 1.1), 0.1; (-0.3, 1), 0.7.
    assert data.episode_returns.tolist() == [2.0, 0.0]
    train.main(["--data", "minari:pointmaze/tiny-v0", "--max-steps", "2", "--batch-size", "4", "--context-len", "2",
                "--n-layer", "1", "--n-embd", "16", "--out", str(tmp_path / "m.pt")])
    assert "rewards relabelled against the evaluation goal (-1, 1)" in capsys.readouterr().out


def test_bootstrap_intervals_and_iqm_match_hand_computed_cases():
    # Two seeds of constant episodes, 0 and 10: a draw of two seeds averages 0, 5 or 10 (1/4, 1/2,
    # 1/4), so the 95% interval spans [0, 10] and the 40% interval is the middle value alone.
    assert stats.bootstrap_mean([[0, 0], [10, 10]]) == (5.0, 0.0, 10.0)
    assert stats.bootstrap_mean([[0, 0], [10, 10]], level=40) == (5.0, 5.0, 5.0)
    assert stats.iqm([1, 2, 3, 4, 5, 6, 7, 8]) == 4.5  # (3 + 4 + 5 + 6) / 4
    assert stats.iqm([0, 1, 1, 1, 1, 1, 1, 100]) == 1.0  # one bad and one lucky run change nothing
    estimate, low, high = stats.bootstrap_iqm({"a": [1, 2, 3], "b": [4, 5, 6]})
    assert estimate == 3.5 and 1 <= low <= 3.5 <= high <= 6
    assert stats.overlaps((1, 0, 2), (3, 1.5, 4)) and not stats.overlaps((1, 0, 2), (3, 2.5, 4))
