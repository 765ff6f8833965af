"""Tests of evaluate.py."""
import json
import os
import signal
import subprocess
import sys
import time

import gymnasium
import h5py
import numpy as np
import pytest
import torch

import evaluate
import train
from common import checkpoint, device, rollout, tasks, vecenv
from common.acting import WindowPolicy
from common.tasks import locomotion_task
from tests.helpers import ROOT, HOPPER, TINY, assert_one_line_error, needs_compiler, run_cli, write_d4rl


def untrained_hopper(tmp_path):
    """A tiny Hopper DT after one training step, and its normalization: its episodes end within a
    few dozen steps, each at its own time."""
    data = write_d4rl(tmp_path / "hopper-x.hdf5", [30, 30], state_dim=11, act_dim=3)
    out = tmp_path / "hopper.pt"
    train.main(["--data", str(data), "--max-steps", "1", *TINY, "--out", str(out)])
    model, norm, _ = checkpoint.load_checkpoint(out)
    return model, norm


def test_finished_episodes_stop_counting_while_the_others_run_on(tmp_path):
    """An untrained Hopper falls within a few dozen steps, each episode at its own time: returns
    from the batched rollout must equal those of each episode run alone."""
    model, norm = untrained_hopper(tmp_path)
    together = rollout.rollout(model, norm, HOPPER, 3600, 4, seed=0, progress=False).returns
    alone = [rollout.rollout(model, norm, HOPPER, 3600, 1, seed=i, progress=False).returns[0] for i in range(4)]
    np.testing.assert_allclose(together, alone, rtol=1e-4)
    assert len(set(np.round(together, 3))) == 4


def test_rollout_counts_each_episodes_steps_and_keeps_observations_only_when_asked(tmp_path):
    """The lengths are the steps each episode ran before it ended (an untrained Hopper falls
    early, each at its own step); a `record` list gets the reset's and every step's observations,
    as many rows as the longest episode ran, plus one."""
    model, norm = untrained_hopper(tmp_path)
    kept = []
    returns, lengths, policy = rollout.rollout(model, norm, HOPPER, 3600, 3, seed=0, progress=False, record=kept)
    assert lengths.dtype == np.int64 and (lengths > 0).all() and (lengths < 1000).all()
    assert len(kept) == lengths.max() + 1 and kept[0].shape == (3, 11) and policy == "target 3600"


def test_the_policy_sees_the_same_shapes_at_every_step(tmp_path, monkeypatch):
    """rollout hands get_action a K-step window every time, padded and masked at the start: the
    fixed shapes that let torch.compile capture one step's forward once and replay it."""
    model, norm = untrained_hopper(tmp_path)
    calls, get_action = [], model.get_action
    # The window's buffers are updated in place, so each call's inputs are copied as they were.
    monkeypatch.setattr(model, "get_action", lambda *a: (calls.append([x if x is None else x.clone() for x in a]),
                                                         get_action(*a))[1])
    rollout.rollout(model, norm, HOPPER, 3600, 3, seed=0, progress=False).returns
    K = model.cfg.context_len
    assert len(calls) > K  # the episodes outlive the padded start
    assert {tuple(x.shape for x in c[:4]) for c in calls} == {((3, K, 11), (3, K, 3), (3, K, 1), (3, K))}
    for t, (*_, timesteps, mask) in enumerate(calls):
        assert timesteps[0, -1] == t
        if t < K - 1:  # the first K - 1 steps: t + 1 real steps on the right
            assert mask.sum(1).tolist() == [t + 1] * 3 and mask[:, -1].all()
        else:
            assert mask is None


@needs_compiler
def test_a_compiled_rollout_acts_as_the_eager_one(tmp_path):
    """torch.compile of the policy (the default on CUDA) gives the same episodes, and the fixed
    shapes keep it to two graphs: the padded start, with its mask, and every step after it.
    (Hopper: an untrained one falls within a few dozen steps, before rounding differences between
    compiled and eager kernels can grow, as they do over a 1000-step HalfCheetah episode.)"""
    model, norm = untrained_hopper(tmp_path)
    torch._dynamo.reset()
    eager = rollout.rollout(model, norm, HOPPER, 3600, 3, progress=False, compile=False).returns
    torch._dynamo.utils.counters.clear()
    compiled = rollout.rollout(model, norm, HOPPER, 3600, 3, progress=False, compile=True).returns
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_evaluation_runs_in_the_precision_the_model_trained_in(tmp_path, monkeypatch, capsys):
    """A checkpoint records whether it trained under bf16 autocast; on a CPU with bf16 arithmetic
    its rollouts run the policy under it too (fp32 actions out, close to fp32's), and say so.
    Checkpoints that never recorded it, CUDA, and CPUs without bf16 stay in fp32."""
    has_bf16 = device.bf16_pays("cpu")  # this machine's own answer
    data = write_d4rl(tmp_path / "hopper-x.hdf5", [30, 30], state_dim=11, act_dim=3)
    out = tmp_path / "hopper.pt"
    train.main(["--data", str(data), "--max-steps", "1", *TINY, "--out", str(out)])
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["bf16"] == has_bf16
    monkeypatch.setattr(device, "bf16_pays", lambda d: True)
    assert device.evaluates_in_bf16(True, "cpu")
    assert not device.evaluates_in_bf16(False, "cpu") and not device.evaluates_in_bf16(True, "cuda")

    model, norm, _ = checkpoint.load_checkpoint(out)
    states = torch.randn(2, 11, generator=torch.Generator().manual_seed(0))
    actions = {bf16: WindowPolicy(model, norm, 3600.0, 2, torch.device("cpu"), bf16=bf16).act(
        states, np.zeros(2), 0) for bf16 in (False, True)}
    assert actions[True].dtype == torch.float32
    assert not torch.equal(actions[True], actions[False])  # it did run in bf16
    torch.testing.assert_close(actions[True], actions[False], atol=0.05, rtol=0)

    edited = tmp_path / "bf16.pt"
    torch.save({**ckpt, "bf16": True}, edited)
    capsys.readouterr()  # the training's lines
    evaluate.main([str(edited), "--episodes", "1", "--json"])
    assert json.loads(capsys.readouterr().out)["precision"] == "bf16"
    ckpt.pop("bf16")
    torch.save(ckpt, edited)  # from before the precision was recorded: fp32, as it was evaluated then
    evaluate.main([str(edited), "--episodes", "1", "--json"])
    assert json.loads(capsys.readouterr().out)["precision"] == "fp32"


def test_sharded_envs_step_exactly_as_one_process():
    """vecenv.ShardedVectorEnv: 5 Hoppers over 2 worker processes give the same observations,
    rewards and ends, autoresets included, as one gymnasium vector env in this process."""
    actions = np.random.default_rng(0).uniform(-1, 1, (60, 5, 3)).astype(np.float32)
    runs = []
    for workers in (1, 2):
        envs = vecenv.make_envs(HOPPER, 5, workers=workers)
        steps = [envs.reset(seed=7)[0]] + [envs.step(a)[:4] for a in actions]
        envs.close()
        runs.append(steps)
    one, sharded = runs
    np.testing.assert_array_equal(one[0], sharded[0])
    for a, b in zip(one[1:], sharded[1:]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert any(step[2].any() for step in one[1:])  # some fell, and were reset, within the 60 steps


def test_a_rollout_with_env_workers_returns_what_one_process_does(tmp_path):
    model, norm = untrained_hopper(tmp_path)
    alone = rollout.rollout(model, norm, HOPPER, 3600, 3, seed=0, progress=False).returns
    sharded = rollout.rollout(model, norm, HOPPER, 3600, 3, seed=0, progress=False, env_workers=2).returns
    np.testing.assert_array_equal(alone, sharded)


def test_a_pipelined_rollout_returns_what_one_process_does(tmp_path):
    """From vecenv.MANY_EPISODES episodes on, the episodes are two parts, each stepped by its own
    workers through shared memory while the policy works out the other part's actions. Episode i
    is still reset with seed + i, and every return is the one a single process gives, bit for
    bit: the parts depend on the number of episodes, not of processes."""
    n = vecenv.MANY_EPISODES
    envs = vecenv.make_envs(HOPPER, n)
    one_vector_env = gymnasium.make_vec("Hopper-v5", num_envs=n, vectorization_mode="sync")
    assert len(envs.parts) == 2
    np.testing.assert_array_equal(envs.reset(seed=7)[0], one_vector_env.reset(seed=7)[0])
    envs.close()
    one_vector_env.close()
    model, norm = untrained_hopper(tmp_path)
    alone = rollout.rollout(model, norm, HOPPER, 3600, n, seed=0, progress=False).returns
    pipelined = rollout.rollout(model, norm, HOPPER, 3600, n, seed=0, progress=False, env_workers=3).returns
    np.testing.assert_array_equal(alone, pipelined)
    assert len(set(np.round(alone, 3))) > n // 2  # each episode its own


def test_env_workers_fail_in_one_line(trained, tmp_path, capsys):
    with pytest.raises(checkpoint.RunError, match="cannot make environment 'Nope-v5'"):
        vecenv.make_envs(tasks.Task("Nope-v5"), 4, workers=2)
    with pytest.raises(SystemExit):
        evaluate.parse_args([str(trained), "--video", str(tmp_path / "x.gif"), "--env-workers", "2"])
    assert "leave out --env-workers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args([str(trained), "--env-workers", "0"])
    assert "--env-workers must be at least 1" in capsys.readouterr().err


def test_ctrl_c_during_an_evaluation_with_env_workers_ends_in_one_line(trained, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group, the workers too: only evaluate.py
    answers it, in one line, and no worker is left behind."""
    err = tmp_path / "stderr"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "evaluate.py", str(trained), "--episodes", "100", "--env-workers", "2"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 90
    while "target" not in err.read_text():  # the progress bar: the workers are stepping
        assert proc.poll() is None and time.time() < deadline, err.read_text()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 1
    lines = [line for line in err.read_text().replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1] == "interrupted" and "Traceback" not in err.read_text(), lines[-10:]
    deadline = time.time() + 10
    while group_alive(proc.pid):  # the workers, and multiprocessing's helper, go with it
        assert time.time() < deadline, subprocess.run(["ps", "-g", str(proc.pid), "-o", "pid,args"],
                                                      capture_output=True, text=True).stdout
        time.sleep(0.1)


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_normalized_score_reference_points():
    assert locomotion_task("HalfCheetah-v5").normalized_score(12135.0) == pytest.approx(100.0)
    assert locomotion_task("HalfCheetah-v5").normalized_score(-280.178953) == pytest.approx(0.0)
    assert locomotion_task("Hopper-v5").normalized_score(3234.3) == pytest.approx(100.0)


def test_a_target_sweep_prints_a_table_and_draws_it(trained, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "sweep.png"
    evaluate.main([str(trained), "--target", "0", "3000", "6000", "--episodes", "2", "--plot", str(png)])
    out = capsys.readouterr().out
    table = out[out.index("achieved (mean ± std)"):].splitlines()[1:4]
    assert [line.split()[0] for line in table] == ["0", "3000", "6000"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_cli_errors_are_one_line(tmp_path, trained):
    missing = tmp_path / "nope.hdf5"
    assert_one_line_error(run_cli("train.py", "--data", str(missing)), str(missing), "no such file")
    junk = tmp_path / "junk.hdf5"
    junk.write_bytes(b"\x00garbage" * 100)
    assert_one_line_error(run_cli("train.py", "--data", str(junk)), str(junk), "HDF5")
    foreign = tmp_path / "foreign.hdf5"
    with h5py.File(foreign, "w") as f:
        f["pixels"] = np.zeros((4, 3))
    assert_one_line_error(run_cli("train.py", "--data", str(foreign)), str(foreign), "observations")
    proc = run_cli("evaluate.py", str(junk))
    assert_one_line_error(proc, str(junk), "not a readable checkpoint")
    assert "Error)" not in proc.stderr  # what went wrong, not the name of a Python exception
    assert_one_line_error(run_cli("evaluate.py", str(tmp_path / "none.pt")), "no such file")
    proc = run_cli("evaluate.py", str(trained), "--episodes", "1")
    assert proc.returncode == 0 and "(1 episode)" in proc.stdout, proc.stderr
