"""Tests of train.py."""
import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import evaluate
import train
from common import checkpoint, device, tasks
from common.checkpoint import CheckpointError, RunError
from data import load_trajectories, sample_batch
from methods.bc import BehaviourCloning
from model import DecisionTransformer
from tests.helpers import (ROOT, TINY, assert_one_line_error, assert_usage_error, edited_checkpoint,
                      needs_compiler, random_window, run_cli, write_d4rl)


def test_behaviour_cloning_baseline_trains_saves_and_evaluates(tmp_path, capsys):
    data = write_d4rl(tmp_path / "halfcheetah-bc.hdf5", [200] * 6)
    out = tmp_path / "bc.pt"
    train.main(["--data", str(data), "--model", "bc", "--max-steps", "150", "--batch-size", "16",
                "--lr", "3e-3", "--log-every", "10", "--out", str(out)])
    with open(out.with_suffix(".csv")) as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert losses[-1] < 0.5 * losses[0]
    model, _, ckpt = checkpoint.load_checkpoint(out)
    assert isinstance(model, BehaviourCloning) and ckpt["model_config"]["kind"] == "bc"
    # The action depends on the current state only: history and return-to-go are ignored.
    s, a, r, t = random_window(3, 5)
    s2, a2, r2, t2 = random_window(3, 5, seed=1)
    s2[:, -1] = s[:, -1]
    torch.testing.assert_close(model.get_action(s, a, r, t), model.get_action(s2, a2, r2, t2))
    capsys.readouterr()
    evaluate.main([str(out), "--target", "0", "12000", "--episodes", "2", "--json"])
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(results) == 1 and results[0]["model"] == "bc" and len(results[0]["returns"]) == 2


def test_reward_mode_and_top_pct_reach_training_and_evaluation(tmp_path, capsys, monkeypatch):
    data = write_d4rl(tmp_path / "halfcheetah-x.hdf5", [100] * 6)
    weights = {}
    for model, mode in [("bc", "dense"), ("bc", "delayed"), ("dt", "dense"), ("dt", "delayed")]:
        out = tmp_path / f"{model}-{mode}.pt"
        train.main(["--data", str(data), "--model", model, "--reward-mode", mode, "--top-pct", "50",
                    "--max-steps", "20", *TINY, "--out", str(out)])
        weights[model, mode] = torch.load(out, weights_only=True)["model"]
    assert "300 steps in 3 episodes (the best 50% of 6)" in capsys.readouterr().out
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(weights["bc", "dense"], weights["bc", "delayed"])  # BC never sees a reward
    assert not same(weights["dt", "dense"], weights["dt", "delayed"])

    # Evaluating a delayed-reward DT holds its return-to-go at the target, as in its training data;
    # a dense one counts the collected reward down.
    seen = []
    get_action = DecisionTransformer.get_action
    monkeypatch.setattr(DecisionTransformer, "get_action",
                        lambda self, s, a, r, *rest: (seen.append(r[:, -1, 0].clone()), get_action(self, s, a, r, *rest))[1])
    for mode in ("delayed", "dense"):
        seen.clear()
        evaluate.main([str(tmp_path / f"dt-{mode}.pt"), "--target", "5000", "--episodes", "2", "--json"])
        rtg = torch.stack(seen)
        assert len(seen) == 1000 and (rtg[0] == 5.0).all()
        assert (rtg == 5.0).all() == (mode == "delayed")


@pytest.mark.parametrize("body, env_id, state_dim, act_dim", [
    ("hopper", "Hopper-v5", 11, 3), ("walker2d", "Walker2d-v5", 17, 6)])
def test_hopper_and_walker_train_and_evaluate_with_early_terminations(tmp_path, capsys, body, env_id,
                                                                     state_dim, act_dim):
    # Episodes of uneven length that end by falling over (terminals), as Hopper and Walker2d do.
    data = write_d4rl(tmp_path / f"{body}-synthetic.hdf5", [40, 15, 70, 9, 33, 25], state_dim=state_dim,
                      act_dim=act_dim)
    out = tmp_path / f"{body}.pt"
    train.main(["--data", str(data), "--max-steps", "20", *TINY, "--out", str(out)])
    assert torch.load(out, weights_only=True)["env_id"] == env_id
    capsys.readouterr()
    evaluate.main([str(out), "--episodes", "3", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["env"] == env_id and result["target"] == tasks.DEFAULT_TARGETS[env_id.split("-")[0]]
    assert len(result["returns"]) == 3


@needs_compiler
def test_a_compiled_forward_gives_the_eager_loss_and_gradients(tmp_path):
    data, _ = load_trajectories(write_d4rl(tmp_path / "halfcheetah-c.hdf5", [50] * 4))
    batch = sample_batch(data, 8, 4, torch.Generator().manual_seed(0))
    results = {}
    for flag in ("--no-compile", "--compile"):
        args = train.parse_args([*TINY, flag, "--dropout", "0", "--no-amp"])
        torch.manual_seed(0)
        model, objective, optimizer = train.setup_training(train.model_config(args, data), args, "cpu")
        assert isinstance(objective, train.ActionLoss) == (flag == "--no-compile")
        loss = objective(*batch)
        loss.backward()
        results[flag] = loss.item(), [p.grad.clone() for p in model.parameters()]
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results.values()
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    for e, c in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6)


def test_one_gpu_compiles_to_cuda_graphs_but_torchrun_and_the_cpu_do_not(monkeypatch):
    assert device.compile_mode("cpu") is None  # no graphs to replay on a CPU
    assert device.compile_mode("cuda") == "reduce-overhead"
    assert device.compile_mode("cuda", graphed=True) is None  # --graph-steps records the whole step
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert device.compile_mode("cuda:1") is None  # DDP's gradient hooks: the default mode


def test_a_target_of_zero_is_asked_for_not_replaced_by_the_default(tmp_path, capsys):
    data = write_d4rl(tmp_path / "halfcheetah-t.hdf5", [50] * 4)
    for target, shown in (("0", "), target 0"), (None, "), target 12000")):
        out = tmp_path / f"t{target}.pt"
        train.main(["--data", str(data), "--max-steps", "2", "--eval-every", "2", "--eval-episodes", "1",
                    *TINY, "--out", str(out)] + (["--target", target] if target else []))
        assert shown in capsys.readouterr().out


def test_compile_without_a_cpp_compiler_is_one_line_not_a_deep_inductor_error(tmp_path, monkeypatch):
    data = write_d4rl(tmp_path / "halfcheetah-cc.hdf5", [50] * 4)
    monkeypatch.setattr(device.shutil, "which", lambda name: None)
    with pytest.raises(RunError, match=r"--compile on a CPU needs a C\+\+ compiler"):
        train.main(["--data", str(data), "--max-steps", "2", *TINY, "--compile", "--out", str(tmp_path / "c.pt")])
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("model", ["dt", "reinformer", "iql", "tt", pytest.param("dt-compiled", marks=needs_compiler),
                                   pytest.param("iql-compiled", marks=needs_compiler)])
def test_resume_continues_a_run_exactly(tmp_path, monkeypatch, model):
    data = write_d4rl(tmp_path / "halfcheetah-r.hdf5", [50] * 4)
    # The DT's dropout stays at 0.1, so the global RNG matters as much as the sampler's; IQL's
    # target networks and its actor's learning-rate schedule must come back too; a compiled
    # forward must give the same steps after a restart as before it.
    iql_size = ["--model", "iql", "--batch-size", "8", "--n-embd", "16"]
    size = {"dt": TINY, "reinformer": ["--model", "reinformer", *TINY], "dt-compiled": [*TINY, "--compile"], "iql": iql_size, "iql-compiled": [*iql_size, "--compile"],
            "tt": ["--model", "tt", "--batch-size", "4", "--n-layer", "1", "--n-head", "2", "--n-embd", "16"]}
    run = ["--data", str(data), "--max-steps", "12", "--log-every", "5", "--save-every", "5", *size[model]]
    straight, split = tmp_path / "straight.pt", tmp_path / "split.pt"
    train.main(run + ["--out", str(straight)])

    calls, real_step = 0, train.train_step

    def step_then_ctrl_c(*args):
        nonlocal calls
        calls += 1
        if calls == 6:  # Ctrl-C arrives during step 6 of 12
            signal.raise_signal(signal.SIGINT)
        return real_step(*args)

    monkeypatch.setattr(train, "train_step", step_then_ctrl_c)
    ctrl_c = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    train.main(run + ["--out", str(split)])
    assert torch.load(split, weights_only=True)["step"] == 6
    assert signal.getsignal(signal.SIGINT) is ctrl_c  # handler restored
    monkeypatch.undo()
    train.main(["--resume", str(split)])

    a, b = torch.load(straight, weights_only=True), torch.load(split, weights_only=True)
    assert a["step"] == b["step"] == 12
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for i, state in a["optimizer"]["state"].items():
        assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in state.items())
    with open(split.with_suffix(".csv")) as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["5", "6", "10", "12"]


@pytest.mark.parametrize("model", ["dt", "iql"])
def test_graphed_steps_are_the_plain_loops_steps_and_resume_exactly(tmp_path, monkeypatch, model):
    """--graph-steps K runs K whole steps per call, the learning rate read from a device table (on a
    GPU, one CUDA graph replay; on a CPU, eagerly): the same steps as the plain loop, to the last bit,
    cut short at log and save points, and stopped and resumed exactly."""
    data = write_d4rl(tmp_path / "halfcheetah-g.hdf5", [50] * 4)
    size = {"dt": TINY, "iql": ["--model", "iql", "--batch-size", "8", "--n-embd", "16"]}[model]
    run = ["--data", str(data), "--max-steps", "12", "--log-every", "5", "--save-every", "5", *size]
    plain, graphed, split = tmp_path / "plain.pt", tmp_path / "graphed.pt", tmp_path / "split.pt"
    train.main(run + ["--out", str(plain)])
    train.main(run + ["--graph-steps", "4", "--out", str(graphed)])  # runs of 4, 1, 4, 1, 2 steps

    calls, real_step = 0, train.train_step

    def step_then_ctrl_c(*args):
        nonlocal calls
        calls += 1
        if calls == 6:  # during step 6: the run of steps 6-9 finishes, then the run stops
            signal.raise_signal(signal.SIGINT)
        return real_step(*args)

    monkeypatch.setattr(train, "train_step", step_then_ctrl_c)
    train.main(run + ["--graph-steps", "4", "--out", str(split)])
    assert torch.load(split, weights_only=True)["step"] == 9
    monkeypatch.undo()
    train.main(["--resume", str(split)])

    a = torch.load(plain, weights_only=True)
    for other in (graphed, split):
        b = torch.load(other, weights_only=True)
        assert b["step"] == 12 and b["train_args"]["graph_steps"] == 4
        for name in a["model"]:
            assert torch.equal(a["model"][name], b["model"][name]), name
        for i, state in a["optimizer"]["state"].items():
            assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in state.items())
    logs = {}
    for path in (plain, graphed, split):
        with open(path.with_suffix(".csv")) as f:
            logs[path] = [(row["step"], row["loss"], row["lr"]) for row in csv.DictReader(f)]
    assert logs[plain] == logs[graphed] and [step for step, *_ in logs[plain]] == ["5", "10", "12"]
    assert [step for step, *_ in logs[split]] == ["5", "9", "10", "12"]


def test_resume_refuses_other_data_and_changed_settings(tmp_path, trained):
    ckpt = edited_checkpoint(trained, tmp_path / "copy.pt")
    other = write_d4rl(tmp_path / "halfcheetah-other.hdf5", [40, 40], seed=5)
    with pytest.raises(CheckpointError, match="trained on other data"):
        train.main(["--resume", ckpt, "--data", str(other)])
    proc = run_cli("train.py", "--resume", ckpt, "--lr", "0.1")
    assert proc.returncode == 2 and "only --data may come with it, not --lr" in proc.stderr
    plain = torch.load(trained, weights_only=True)
    del plain["rng"]  # what a model-only checkpoint looks like
    torch.save(plain, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="no training state"):
        train.main(["--resume", str(tmp_path / "plain.pt")])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig):
    data = write_d4rl(tmp_path / "halfcheetah-c.hdf5", [50] * 4)
    out = tmp_path / "run.pt"
    proc = subprocess.Popen([sys.executable, "train.py", "--data", str(data), "--max-steps", "100000",
                             "--log-every", "1", *TINY, "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out.with_suffix(".csv"), time.time() + 90
    while not (log.exists() and len(log.read_text().splitlines()) >= 4):  # a few steps in
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)
    # A second run aimed at the same files while this one is going is refused, naming it.
    second = run_cli("train.py", "--data", str(data), "--max-steps", "5", *TINY, "--out", str(out), "--overwrite")
    assert_one_line_error(second, str(out), "still going", f"pid {proc.pid}")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    step = torch.load(out, weights_only=True)["step"]
    assert 3 <= step < 100000 and f"python train.py --resume {out}" in stdout
    assert log.read_text().splitlines()[-1].startswith(f"{step},")


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = write_d4rl(tmp_path / "halfcheetah-n.hdf5", [50] * 4)
    out, calls, real_loss = tmp_path / "nan.pt", 0, train.action_loss

    def loss_that_blows_up_at_step_8(*args):
        nonlocal calls
        calls += 1
        return real_loss(*args) * (float("nan") if calls >= 8 else 1.0)

    monkeypatch.setattr(train, "action_loss", loss_that_blows_up_at_step_8)
    with pytest.raises(RunError, match=r"became nan at step 8; stopped \(.*nan.pt keeps step 5\)"):
        train.main(["--data", str(data), "--max-steps", "20", "--log-every", "3", "--save-every", "5",
                    *TINY, "--out", str(out)])
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_bad_training_arguments_are_refused_before_any_work(tmp_path):
    data = str(write_d4rl(tmp_path / "halfcheetah-a.hdf5", [30, 30]))
    for flags, words in [(["--epochs", "-1"], "--epochs must be above 0"), (["--epochs", "0"], "--epochs"),
                         (["--max-steps", "0"], "--max-steps must be at least 1"),
                         (["--batch-size", "0"], "--batch-size must be at least 1"),
                         (["--graph-steps", "-1"], "--graph-steps must be at least 0"),
                         (["--n-embd", "30", "--n-head", "4"], "multiple of --n-head")]:
        assert_usage_error(run_cli("train.py", "--data", data, *flags, "--out", str(tmp_path / "x.pt")), words)
    assert not (tmp_path / "x.pt").exists()
    # A folder where a file is expected says so, instead of "no such file".
    assert_one_line_error(run_cli("train.py", "--data", str(tmp_path)), str(tmp_path), "is a folder")


def test_a_run_reports_its_budget_precision_and_full_progress(tmp_path):
    data = write_d4rl(tmp_path / "halfcheetah-p.hdf5", [50] * 4)
    proc = run_cli("train.py", "--data", str(data), "--max-steps", "7", *TINY, "--out", str(tmp_path / "p.pt"))
    assert proc.returncode == 0, proc.stderr
    assert "'epochs': None, 'max_steps': 7" in proc.stdout  # the budget that counts, not the default
    precision = "bf16 autocast" if train.use_bf16(train.parse_args([]), "cpu") else "fp32"
    assert f"device cpu, {precision}" in proc.stdout
    # Written to a pipe, not a terminal: plain lines, no carriage returns, the last step counted too.
    assert "\r" not in proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.startswith("step ")][-1]
    assert last.startswith("step 7/7 (100%)  loss ") and "steps/s" in last and last.endswith(" left")
