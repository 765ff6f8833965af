"""Tests of common/video.py: evaluate.py --video."""
import json
import sys

import numpy as np
import pytest

import evaluate
from common import video


def test_video_renders_the_first_episode_without_changing_its_return(trained, tmp_path, capsys, monkeypatch):
    backend = video.offscreen_gl_backend()
    if backend is None:
        pytest.skip("no off-screen OpenGL here (neither EGL nor OSMesa works)")
    monkeypatch.setenv("MUJOCO_GL", backend)
    gif = tmp_path / "cheetah.gif"
    evaluate.main([str(trained), "--target", "3000", "--episodes", "2", "--video", str(gif),
                   "--video-seconds", "0.25"])
    out = capsys.readouterr().out
    first_return = out.split("returns:")[1].split()[0]
    assert f"video: {gif} (episode 0, target 3000: return {first_return})" in out
    from PIL import Image
    with Image.open(gif) as image:  # 0.25 s at HalfCheetah's 20 steps/s, plus the reset frame
        assert image.format == "GIF" and image.size == video.SIZE and image.n_frames == 6
        image.seek(5)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 5  # a picture, not a blank frame
    # Widening the floor for the camera must not change the physics.
    evaluate.main([str(trained), "--target", "3000", "--episodes", "2", "--json"])
    assert json.loads(capsys.readouterr().out)["returns"][0] == pytest.approx(float(first_return), abs=0.06)


def test_video_arguments_are_checked_before_any_rollout(trained, tmp_path, capsys, monkeypatch):
    def error_of(*args):
        with pytest.raises(SystemExit) as exit_:
            evaluate.parse_args([str(trained), *args])
        assert exit_.value.code == 2
        return capsys.readouterr().err

    assert "must end in .mp4 or .gif" in error_of("--video", str(tmp_path / "x.avi"))
    assert "no such directory" in error_of("--video", str(tmp_path / "missing" / "x.gif"))
    assert "must be positive" in error_of("--video", str(tmp_path / "x.gif"), "--video-seconds", "0")
    monkeypatch.setattr(video, "offscreen_gl_backend", lambda: None)
    assert "apt install libegl1 or libosmesa6" in error_of("--video", str(tmp_path / "x.gif"))
    monkeypatch.setattr(video, "offscreen_gl_backend", lambda: "egl")
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if it were not installed
    monkeypatch.setenv("MUJOCO_GL", "egl")  # parse_args sets it; monkeypatch puts it back
    args = evaluate.parse_args([str(trained), "--video", str(tmp_path / "x.mp4")])
    assert args.video == tmp_path / "x.gif" and "pip install imageio-ffmpeg" in capsys.readouterr().err
