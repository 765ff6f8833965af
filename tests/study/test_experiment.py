"""Tests of study/experiment.py."""
import csv
import importlib.util
import json

import pytest
import torch

from common.tasks import locomotion_task
from study import experiment


def test_the_experiment_plan_and_its_results_table(tmp_path, monkeypatch, capsys):
    names = [name for name, *_ in experiment.plan()]
    assert len(names) == len(set(names))
    for body in experiment.STUDIES["medium-expert"]:
        for method, seeds in (("dt-dense", 3), ("iql-dense", 3), ("dt-delayed", 2), ("iql-delayed", 2),
                              ("bc-dense", 3), ("bc10-dense", 3), ("bc-delayed", 0), ("bc10-delayed", 0),
                              ("tt-dense", 2), ("tt-delayed", 0)):
            assert sum(n.startswith(f"{body}-{method}-s") for n in names) == seeds, (body, method)
        # The TT in a CPU sitting's budget: the two bodies whose full budget a sitting cannot hold.
        assert sum(n.startswith(f"{body}-tt-3500-dense-s") for n in names) == (0 if body == "hopper" else 2)
    for maze in experiment.STUDIES["maze2d"]:  # every method, 3 seeds, the file's own sparse rewards
        for method in ("dt", "bc", "bc10", "iql"):
            assert sum(n.startswith(f"{maze}-{method}-s") for n in names) == 3, (maze, method)
    monkeypatch.setattr(experiment, "RESULTS", tmp_path)
    (tmp_path / "runs").mkdir()
    low, high = locomotion_task("Hopper-v5").ref_returns
    for seed, score in ((0, 90.0), (1, 80.0)):  # ten episodes of the same return each
        ret = low + score / 100 * (high - low)
        row = dict(env="Hopper-v5", method="dt", dataset=experiment.FILES["hopper"], reward_mode="dense", seed=seed,
                   steps=10, train_s=1.0, target=3600.0, episodes=10, returns=[ret] * 10, mean_return=ret,
                   std_return=0.0, normalized_score=score)
        (tmp_path / "runs" / f"hopper-dt-dense-s{seed}.json").write_text(json.dumps(row))
    experiment.main(["--table", "--study", "medium-expert"])
    # Resampling two seeds gives 80, 85 or 90: the interval spans both; no IQM without every body.
    assert "| dt | dense | not run yet | 85.0 [80.0, 90.0] (90.0, 80.0) | not run yet | – |" in capsys.readouterr().out
    with open(tmp_path / "medium-expert.csv") as f:
        assert [r["seed"] for r in csv.DictReader(f)] == ["0", "1"]
    if importlib.util.find_spec("matplotlib"):  # the learning curves, from the runs' training logs
        (tmp_path / "runs" / "hopper-dt-dense-s0.csv").write_text(
            "step,loss,lr,elapsed_s,eval_return,eval_score\n100,0.5,1e-4,10.0,,\n200,0.4,1e-4,20.0,3000.0,90.0\n")
        experiment.main(["--curves", str(tmp_path / "curves.png")])
        assert capsys.readouterr().out.strip() == f"experiment: {tmp_path / 'curves.png'}"
        assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_experiment_run_stopped_part_way_is_not_scored(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "ROOT", tmp_path)
    monkeypatch.setattr(experiment, "RESULTS", tmp_path / "results")

    def train_stopped_by_sigterm(cmd, **kwargs):  # train.py saved step 40 of 100 and exited cleanly
        torch.save({"step": 40, "total_steps": 100, "elapsed_s": 1.0}, tmp_path / "runs" / "hopper-dt-dense-s0.pt")

    monkeypatch.setattr(experiment.subprocess, "run", train_stopped_by_sigterm)
    with pytest.raises(SystemExit, match="stopped at step 40 of 100; the same command carries on from there"):
        experiment.run("hopper-dt-dense-s0", "hopper", "dt", "dense", 0, str(tmp_path))
    assert not (tmp_path / "results" / "runs" / "hopper-dt-dense-s0.json").exists()


def test_a_planners_evaluation_is_kept_part_by_part_and_resumed_at_the_first_unfinished_part(tmp_path,
                                                                                             monkeypatch):
    calls = []

    def evaluate_py(ckpt, flags):  # episode i earns return i; the second call is stopped
        first, n = int(flags[flags.index("--seed") + 1]), int(flags[flags.index("--episodes") + 1])
        calls.append(first)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [dict(env="Hopper-v5", model="tt", returns=[float(first + i) for i in range(n)],
                     ref_returns=[0.0, 10.0], seconds_per_step=2.0 + first, env_steps_per_s=0.0)]

    monkeypatch.setattr(experiment, "evaluate", evaluate_py)
    ckpt = tmp_path / "hopper-tt-dense-s0.pt"
    with pytest.raises(KeyboardInterrupt):
        experiment.evaluate_in_parts(ckpt, 6, 2, ["--beam-width", "2"])
    assert calls == [0, 2] and (tmp_path / "hopper-tt-dense-s0.episodes0.json").exists()
    result = experiment.evaluate_in_parts(ckpt, 6, 2, ["--beam-width", "2"])
    assert calls == [0, 2, 2, 4]  # the finished part was not planned again
    assert result["returns"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0] and result["episodes"] == 6
    assert result["normalized_score"] == pytest.approx(25.0)  # mean return 2.5 of the reference 0-10
    assert result["seconds_per_step"] == pytest.approx(4.0)  # the parts' 2, 4 and 6 s a step for 2 episodes
    assert result["env_steps_per_s"] == pytest.approx(0.5) and result["episodes_together"] == 2
