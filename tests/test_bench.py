"""Tests of bench.py."""
import json

import pytest

import bench
from tests.helpers import TINY, needs_compiler


def test_bench_runs_and_reports_every_figure(capsys):
    result = bench.main(["--synthetic", "--steps", "2", "--warmup", "1", "--eval-episodes", "1", "2",
                         "--n-layer", "1", "--n-embd", "32", "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    for key in ("train_samples_per_s", "train_steps_per_s", "sampler_ms_per_batch", "eval_env_steps_per_s",
                "eval_env_steps_per_s_sequential", "peak_mem_mb", "peak_gflops", "train_flop_fraction",
                "eval_flop_fraction", "train_steps_per_s_sdpa_attention"):
        assert result[key] > 0, key
    assert result["train_flop_fraction"] < 1 and result["eval_flop_fraction"] < 1  # nothing beats the peak
    # Twice the episodes, twice the forward's FLOPs: the count is of the real model, per episode.
    flops = result["eval_forward_gflop_by_episodes"]
    assert flops[2] == pytest.approx(2 * flops[1], rel=1e-6)
    assert result["device"].startswith("cpu") and set(result["eval_env_steps_per_s_by_episodes"]) == {1, 2}


def test_bench_times_the_trajectory_transformer_and_its_planning(capsys, monkeypatch):
    """--model tt: the TT's training step, and planning steps (beam search, one action for every
    episode) in place of rollouts, each with its FLOPs against the peak."""
    write_synthetic = bench.write_synthetic
    monkeypatch.setattr(bench, "write_synthetic", lambda path: write_synthetic(path, episodes=20, length=50))
    result = bench.main(["--synthetic", "--model", "tt", "--steps", "1", "--warmup", "1", "--batch-size", "4",
                         "--n-layer", "1", "--n-embd", "16", "--n-head", "1", "--eval-episodes", "1", "3",
                         "--beam-width", "2", "--horizon", "2", "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert result["model"] == "tt" and (result["beam_width"], result["horizon"]) == (2, 2)
    assert result["train_steps_per_s"] > 0 and 0 < result["train_flop_fraction"] < 1
    assert result["train_steps_per_s_sdpa_attention"] > 0  # the step with SDPA's attention, for the ratio
    rate, flops = result["plan_env_steps_per_s_by_episodes"], result["plan_gflop_by_episodes"]
    assert set(rate) == {1, 3} and min(rate.values()) > 0
    assert flops[3] == pytest.approx(3 * flops[1], rel=0.01)  # every episode plans with the same beams
    assert all(0 < f < 1 for f in result["plan_flop_fraction_by_episodes"].values())


def test_bench_flags_for_another_model_are_refused(capsys):
    for argv, words in ((["--beam-width", "4"], "for --model tt only"),
                        (["--model", "iql", "--check"], "leave out --model"),
                        (["--model", "tt", "--horizon", "0"], "at least 1"),
                        (["--check", "--graph-steps", "0"], "--graph-steps must be at least 1")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert words in capsys.readouterr().err


@needs_compiler
def test_the_compiled_path_check_reports_each_mode_against_eager(capsys):
    result = bench.main(["--synthetic", "--check", "--steps", "4", "--warmup", "1", "--eval-episodes", "2",
                         "--compile-modes", "default", "--graph-steps", "2", "--env-workers", "2", *TINY])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    for mode in ("eager", "default", "whole-step graph"):  # the last runs its steps 2 at a time
        assert result[mode]["steps_per_s"] > 0, mode
        # 1M synthetic steps in batches of 8 windows of 4: 31,250 steps an epoch
        assert result[mode]["epochs_120_s"] == pytest.approx(120 * 31250 / result[mode]["steps_per_s"])
    assert result["max_loss_gap"] < 0.05  # the same batches and seed: compiled training learns the same
    assert result["env_workers"] == 2  # the rollouts step their environments in 2 processes
    for curve in ("eval_env_steps_per_s_by_episodes", "eval_compiled_env_steps_per_s_by_episodes",
                  "env_only_steps_per_s_by_episodes", "env_only_steps_per_s_by_episodes_workers"):
        assert set(result[curve]) == {2} and result[curve][2] > 0
