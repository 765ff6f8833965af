"""Tests of checkpoint.py."""
from pathlib import Path

import pytest
import torch

import train
from common import checkpoint
from common.checkpoint import RunError
from common.tasks import locomotion_task
from model import DecisionTransformer, DTConfig
from tests.helpers import S, TINY, assert_one_line_error, edited_checkpoint, random_window, run_cli, write_d4rl


def test_checkpoint_round_trip(trained):
    model, _, ckpt = checkpoint.load_checkpoint(trained)
    assert ckpt["step"] == 80 and ckpt["env_id"] == "HalfCheetah-v5" and ckpt["reward_scale"] == 1000.0
    assert ckpt["model_config"]["context_len"] == 5 and ckpt["train_args"]["batch_size"] == 16
    assert ckpt["state_mean"].shape == (S,) and "state" in ckpt["optimizer"]
    raw = torch.load(trained, weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, raw["model"][name])
    s, a, r, t = random_window(2, 5)
    fresh = DecisionTransformer(DTConfig(**ckpt["model_config"])).eval()
    fresh.load_state_dict(raw["model"])
    torch.testing.assert_close(model(s, a, r, t), fresh(s, a, r, t))
    assert not list(trained.parent.glob(".*partial*"))  # the atomic write left nothing behind


def test_an_output_folder_is_made_and_an_unwritable_one_is_refused_before_training(tmp_path, capsys):
    data = str(write_d4rl(tmp_path / "halfcheetah-o.hdf5", [50] * 4))
    out = tmp_path / "runs" / "exp1" / "ckpt.pt"
    train.main(["--data", data, "--max-steps", "2", *TINY, "--out", str(out)])
    assert out.exists() and out.with_suffix(".csv").exists() and not Path(f"{out}.lock").exists()
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder should be")
    bad = blocker / "ckpt.pt"
    proc = run_cli("train.py", "--data", data, "--max-steps", "2", *TINY, "--out", str(bad))
    assert_one_line_error(proc, str(bad), "cannot write", "--out")
    assert "data:" not in proc.stdout  # refused before the data was loaded


def test_a_finished_run_is_replaced_only_when_asked(tmp_path):
    data = str(write_d4rl(tmp_path / "halfcheetah-w.hdf5", [50] * 4))
    out = tmp_path / "run.pt"
    run = ["train.py", "--data", data, "--max-steps", "3", *TINY, "--out", str(out)]
    assert run_cli(*run).returncode == 0
    before = out.read_bytes()
    assert_one_line_error(run_cli(*run), str(out), "already holds a run (step 3)", "--overwrite", "--resume")
    assert out.read_bytes() == before and not Path(f"{out}.lock").exists()
    proc = run_cli(*run, "--overwrite", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() != before


def test_a_full_disk_during_a_save_ends_in_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    data = str(write_d4rl(tmp_path / "halfcheetah-d.hdf5", [50] * 4))
    out, real_save, saves = tmp_path / "full.pt", torch.save, []

    def save_then_run_out_of_space(obj, f):
        saves.append(obj["step"])
        if len(saves) == 2:  # what torch.save raises when the disk fills up mid-write
            Path(f).write_bytes(b"half a checkpoint")
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                               "file data/3: file write failed")
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", save_then_run_out_of_space)
    with pytest.raises(RunError) as err:
        train.main(["--data", data, "--max-steps", "20", "--save-every", "4", *TINY, "--out", str(out)])
    message = str(err.value)
    assert "\n" not in message and f"cannot write {out}" in message and "disk full" in message
    assert f"still holds step 4, resume from it with --resume {out}" in message
    monkeypatch.undo()
    assert torch.load(out, weights_only=True)["step"] == 4  # the previous save is whole
    assert not list(tmp_path.glob(".*partial*"))


class RunsCodeWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):  # unpickling would call open(path, "w"): a harmless stand-in for malware
        return open, (self.path, "w")


def test_a_checkpoint_cannot_run_code(tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": RunsCodeWhenUnpickled(marker)}, evil)
    assert_one_line_error(run_cli("evaluate.py", str(evil)), str(evil), "not a readable checkpoint")
    assert_one_line_error(run_cli("train.py", "--resume", str(evil)), str(evil), "not a readable checkpoint")
    assert not marker.exists()


def test_checkpoints_for_another_env_size_or_format_are_refused_in_one_line(tmp_path, trained):
    # A HalfCheetah checkpoint in Hopper; Walker2d has HalfCheetah's sizes, so the name must decide.
    assert_one_line_error(run_cli("evaluate.py", str(trained), "--env", "Hopper-v5"),
                          str(trained), "trained in HalfCheetah-v5, not Hopper-v5")
    walker = edited_checkpoint(trained, tmp_path / "walker.pt", env_id="Walker2d-v5",
                               task=locomotion_task("Walker2d-v5").to_dict())
    assert_one_line_error(run_cli("evaluate.py", walker, "--env", "HalfCheetah-v5"), walker, "Walker2d-v5")
    newer = edited_checkpoint(trained, tmp_path / "v2.pt", format_version=2)
    assert_one_line_error(run_cli("evaluate.py", newer), newer, "format version 2", "reads version 1")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, foreign)
    assert_one_line_error(run_cli("evaluate.py", str(foreign)), str(foreign), "not a checkpoint written by")
    weights = torch.load(trained, weights_only=True)["model"]
    weights.pop("predict_action.weight")
    damaged = edited_checkpoint(trained, tmp_path / "damaged.pt", model=weights)
    assert_one_line_error(run_cli("evaluate.py", damaged), damaged, "weights do not fit")
    # 11 observations but labelled HalfCheetah (17): refused by size before any rollout.
    data = write_d4rl(tmp_path / "halfcheetah-small.hdf5", [30, 30], state_dim=11)
    small = tmp_path / "small.pt"
    train.main(["--data", str(data), "--max-steps", "2", "--n-layer", "1", "--n-embd", "16",
                "--out", str(small)])
    assert_one_line_error(run_cli("evaluate.py", str(small), "--episodes", "1"), str(small),
                          "observations of size 17", "trained for 11")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_is_one_line_before_any_work(tmp_path, trained):
    missing = tmp_path / "not-loaded.hdf5"  # never read: the device is checked first
    assert_one_line_error(run_cli("train.py", "--device", "cuda", "--data", str(missing)), "--device cuda",
                          "--device cpu")
    assert_one_line_error(run_cli("evaluate.py", str(trained), "--device", "cuda"), "--device cuda")
