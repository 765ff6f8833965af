"""Tests of distributed.py."""
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, TINY, write_d4rl


@pytest.mark.parametrize("model", ["dt", "iql"])
def test_torchrun_trains_data_parallel_on_two_cpu_processes(tmp_path, model):
    data = write_d4rl(tmp_path / "halfcheetah-ddp.hdf5", [50] * 4)
    # Both cover an epoch (200 steps) in half the steps with two processes: the DT in windows of
    # 4 x batch 8, IQL in transitions, batch 16.
    size, steps, weight = {"dt": (TINY, (14, 8), "predict_action.weight"),
                           "iql": (["--model", "iql", "--batch-size", "16", "--n-embd", "16"], (26, 14), "q1.0.weight")}[model]
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}.pt"
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        proc = subprocess.run([*(launch if world == 2 else [sys.executable]), "train.py", "--data", str(data),
                               "--epochs", "2", "--log-every", "2", *size, "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        runs[world] = proc.stdout, torch.load(out, weights_only=True)
    assert f"{steps[0]} steps ({steps[0] // 2} per epoch)" in runs[1][0]
    assert f"{steps[1]} steps ({steps[1] // 2} per epoch)" in runs[2][0]
    stdout, ckpt = runs[2]
    assert stdout.count("config:") == 1 and "2 processes" in stdout  # only process 0 speaks
    assert ckpt["step"] == steps[1] and len((tmp_path / "world2.csv").read_text().splitlines()) == 1 + steps[1] // 2
    # Process 1's batches (another seed) reached the weights through the averaged gradients.
    assert not torch.equal(ckpt["model"][weight], runs[1][1]["model"][weight])
