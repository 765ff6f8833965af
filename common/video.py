"""
Filming an evaluation episode: off-screen OpenGL, a camera that follows the body, MP4 or GIF files.
evaluate.py --video uses it; rollout.rollout hands each frame of episode 0 to a Recorder.
"""
import os
import subprocess
import sys

import torch

from common.checkpoint import atomic_write

SIZE = (480, 320)  # multiples of 16, which MP4 encoders want


def offscreen_gl_backend():
    """The MUJOCO_GL backend that renders here without a display, or None. EGL drives a GPU and
    OSMesa renders in software; Mesa's EGL also renders on a CPU. Each is tried in a child process,
    because PyOpenGL binds to one platform on first import and a failed attempt cannot be undone."""
    if os.environ.get("MUJOCO_GL"):
        candidates = [os.environ["MUJOCO_GL"]]
    else:
        candidates = ["egl", "osmesa"] if torch.cuda.is_available() else ["osmesa", "egl"]
    probe = "import mujoco; c = mujoco.GLContext(16, 16); c.make_current(); c.free()"
    for name in candidates:
        child = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "MUJOCO_GL": name},
                               capture_output=True)
        if child.returncode == 0:
            return name
    return None


class Recorder:
    """Collects episode 0's frames during a rollout, only the first `seconds` of it when given
    (rendering costs more than the rest of a step), and writes them as a video."""

    def __init__(self, seconds=None):
        self.seconds = seconds
        self.frames = []

    def env_kwargs(self, task):
        """Rendering settings for the task's env. A body is filmed by "track", a side-on camera in
        its XML that follows its centre of mass (the default camera stands still and HalfCheetah
        leaves the picture within two seconds). A maze's default camera looks down on all of it."""
        kwargs = dict(render_mode="rgb_array", width=SIZE[0], height=SIZE[1])
        return kwargs if task.observation_key else {**kwargs, "camera_name": "track"}

    def prepare(self, env):
        if has_floor(env.unwrapped.model):
            widen_floor(env.unwrapped.model)
        # Environment steps per simulated second: one frame per step plays in real time.
        self.fps = env.metadata["render_fps"]
        self.max_frames = round(self.seconds * self.fps) + 1 if self.seconds else None

    def capture(self, env):
        if self.max_frames is None or len(self.frames) < self.max_frames:
            self.frames.append(env.render())

    def write(self, path):
        write_video(self.frames, path, self.fps)


def has_floor(model):
    try:
        model.geom("floor")
        return True
    except KeyError:
        return False


def widen_floor(model, half_size=1000.0):
    """The floor is drawn 40 m wide (20 m for Hopper) and an expert cheetah runs 600 m, so it
    would run off the picture into empty sky. A plane's size matters only for drawing (it collides
    as an infinite plane), so widening it, and tiling its texture as often, changes no return."""
    floor = model.geom("floor")
    scale = half_size / floor.size[0]
    floor.size[:2] *= scale
    model.mat_texrepeat[floor.matid] *= scale


def write_video(frames, path, fps):
    # 20 fps for HalfCheetah but 125 for Hopper and Walker2d. GIF timing counts hundredths of a
    # second and players slow down anything much faster, so keep every k-th frame for about
    # 25 fps; that is plenty to watch a gait.
    every = max(1, round(fps / 25))
    frames, fps = frames[::every], fps / every
    with atomic_write(path) as tmp:
        if path.suffix == ".gif":
            write_gif(frames, tmp, fps)
        else:
            import imageio.v3 as iio  # installed with gymnasium[mujoco]; MP4 also needs imageio-ffmpeg

            iio.imwrite(tmp, frames, plugin="FFMPEG", fps=fps)


def write_gif(frames, path, fps):
    from PIL import Image  # installed with imageio

    # One palette for the whole clip, taken from the first frame (every frame shows the same
    # floor, sky and body), and no dithering: dither noise differs from frame to frame and
    # defeats GIF's compression of what did not change, tripling the file.
    palette = Image.fromarray(frames[0]).quantize(64, method=Image.Quantize.MEDIANCUT)
    images = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def check_video_path(parser, video):
    """Settle the renderer and the file format when the arguments are parsed, not after minutes
    of rollouts: -> the path to write (a GIF where no MP4 encoder is installed)."""
    if video.suffix not in (".mp4", ".gif"):
        parser.error(f"--video {video}: the file name must end in .mp4 or .gif")
    backend = offscreen_gl_backend()
    if backend is None:
        tried = os.environ.get("MUJOCO_GL") or "osmesa, egl"
        parser.error(f"--video needs off-screen OpenGL and none works here (tried MUJOCO_GL={tried}): "
                     "install EGL or OSMesa (Debian/Ubuntu: apt install libegl1 or libosmesa6)")
    os.environ["MUJOCO_GL"] = backend  # read by gymnasium's renderer when it makes its context
    if video.suffix == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401  (the ffmpeg that imageio writes MP4 with)
        except ImportError:
            video = video.with_suffix(".gif")
            print(f"no MP4 encoder installed (pip install imageio-ffmpeg): writing {video} instead",
                  file=sys.stderr)
    return video
