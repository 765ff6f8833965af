"""
Roll a trained Decision Transformer out in its MuJoCo environment, asking it for a target return.

    python evaluate.py ckpt.pt --target 6000
    python evaluate.py ckpt.pt --target 6000 12000 --episodes 10 --json
    python evaluate.py ckpt.pt --target 6000 --video cheetah.mp4

All episodes run side by side in a gymnasium vector env, and each environment step is one batched
model forward for all of them.
"""
import argparse
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model import DTConfig, build_model

FORMAT_VERSION = 1

# D4RL's reference returns (d4rl/infos.py): a random policy and the expert used to normalize
# scores, 100 * (R - random) / (expert - random).
D4RL_REF_RETURNS = {
    "HalfCheetah": (-280.178953, 12135.0),
    "Hopper": (-20.272305, 3234.3),
    "Walker2d": (1.629008, 4592.3),
}
# Return asked for when no --target is given: a little above the best episodes in expert data.
DEFAULT_TARGETS = {"HalfCheetah": 12000.0, "Hopper": 3600.0, "Walker2d": 5000.0}


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def body(env_id):
    return env_id.split("-")[0]


def normalized_score(env_id, ret):
    low, high = D4RL_REF_RETURNS[body(env_id)]
    return 100.0 * (ret - low) / (high - low)


def quiet_mujoco():
    """MuJoCo 4 warns on every load of HalfCheetah's XML that `settotalmass` is deprecated; it is
    gymnasium's model file, not something a user can act on. Other MuJoCo warnings still print."""
    import mujoco

    def warn(msg):
        if "settotalmass" not in msg:
            print(f"MuJoCo warning: {msg}", file=sys.stderr)

    mujoco.set_mju_user_warning(warn)


def make_envs(env_id, num_envs, render=False):
    import gymnasium as gym

    quiet_mujoco()
    # Rendering is set up in every env but costs nothing until render() is called (on env 0 only).
    # "track" is a side-on camera in each body's XML that follows its centre of mass; the default
    # camera stands still and HalfCheetah leaves the picture within two seconds.
    video = dict(render_mode="rgb_array", width=VIDEO_SIZE[0], height=VIDEO_SIZE[1],
                 camera_name="track") if render else {}
    try:
        envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync", **video)
    except gym.error.Error as e:
        raise CheckpointError(f"cannot make environment {env_id!r}: {e}") from None
    if render:
        widen_floor(envs.envs[0].unwrapped.model)
    return envs


def widen_floor(model, half_size=1000.0):
    """The floor is drawn 40 m wide (20 m for Hopper) and an expert cheetah runs 600 m, so it
    would run off the picture into empty sky. A plane's size matters only for drawing (it collides
    as an infinite plane), so widening it, and tiling its texture as often, changes no return."""
    floor = model.geom("floor")
    scale = half_size / floor.size[0]
    floor.size[:2] *= scale
    model.mat_texrepeat[floor.matid] *= scale


def check_env_matches(envs, env_id, cfg):
    obs_dim = envs.single_observation_space.shape[0]
    act_dim = envs.single_action_space.shape[0]
    if (obs_dim, act_dim) != (cfg.state_dim, cfg.act_dim):
        raise CheckpointError(
            f"{env_id} has observations of size {obs_dim} and actions of size {act_dim}, but the "
            f"model was trained for {cfg.state_dim} and {cfg.act_dim}")


@torch.no_grad()
def rollout(model, env_id, target, episodes, state_mean, state_std, reward_scale, seed=0,
            device="cpu", progress=True, frames=None, max_frames=None, delayed=False):
    """Run `episodes` episodes in parallel; returns their undiscounted returns (np.ndarray).
    `delayed`: the model was trained on delayed rewards (see data.delay_rewards).
    Given a list as `frames`, episode 0 is also rendered into it, one RGB image per step (for its
    first `max_frames` steps when given: rendering costs more than the rest of a step)."""
    envs = make_envs(env_id, episodes, render=frames is not None)
    check_env_matches(envs, env_id, model.cfg)
    max_steps = envs.envs[0].spec.max_episode_steps or 1000
    S, A = model.cfg.state_dim, model.cfg.act_dim
    states = torch.zeros(episodes, max_steps, S, device=device)
    actions = torch.zeros(episodes, max_steps, A, device=device)
    rtg = torch.zeros(episodes, max_steps, 1, device=device)
    timesteps = torch.arange(max_steps, device=device).expand(episodes, max_steps)
    mean, std = state_mean.to(device), state_std.to(device)
    returns = np.zeros(episodes)
    done = np.zeros(episodes, bool)

    model.eval()
    obs, _ = envs.reset(seed=seed)
    if frames is not None:
        frames.append(envs.envs[0].render())
    for t in tqdm(range(max_steps), desc=f"target {target:g}", leave=False, disable=not progress):
        states[:, t] = (torch.as_tensor(obs, dtype=torch.float32, device=device) - mean) / std
        # The return still to be earned: the target minus what each episode has collected. A model
        # trained on delayed rewards saw the return-to-go stay at the episode's total at every
        # step, so it is held at the target, as in the DT paper's delayed-return evaluation.
        collected = 0.0 if delayed else returns
        rtg[:, t, 0] = torch.as_tensor((target - collected) / reward_scale, dtype=torch.float32)
        lo = max(0, t + 1 - model.cfg.context_len)
        action = model.get_action(states[:, lo:t + 1], actions[:, lo:t + 1], rtg[:, lo:t + 1],
                                  timesteps[:, lo:t + 1])
        actions[:, t] = action
        obs, reward, terminated, truncated, _ = envs.step(action.float().cpu().numpy())
        returns += np.where(done, 0.0, reward)  # a finished episode stops counting
        if frames is not None and not done[0] and len(frames) < (max_frames or max_steps + 1):
            frames.append(envs.envs[0].render())
        done |= terminated | truncated
        if done.all():
            break
    envs.close()
    return returns


CHECKPOINT_KEYS = ("model", "model_config", "state_mean", "state_std", "reward_scale", "env_id")


def read_checkpoint(path, device="cpu"):
    """The dict train.py saved, checked to be one of ours in a format this code reads."""
    try:
        # weights_only: a checkpoint holds tensors and plain values only, so loading one from a
        # stranger cannot run code (a pickle that asks to call a function is refused).
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint written by this code's train.py")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {ckpt['format_version']!r}, but this "
                              f"code reads version {FORMAT_VERSION}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: damaged checkpoint, missing {', '.join(missing)}")
    return ckpt


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint written by train.py -> (model, checkpoint dict)."""
    ckpt = read_checkpoint(path, device)
    try:
        model = build_model(DTConfig(**ckpt["model_config"])).to(device)
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # a config or weights that do not fit the model this code builds
        raise CheckpointError(f"{path}: damaged checkpoint, its weights do not fit its config "
                              f"({type(e).__name__})") from None
    return model.eval(), ckpt


VIDEO_SIZE = (480, 320)  # multiples of 16, which MP4 encoders want


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


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`, renamed over it once written: os.replace is atomic,
    so an interrupted write leaves the old file (or none), never a truncated one. The temporary
    name keeps the suffix because writers pick the file format from it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def steps_per_second(env_id):
    """Environment steps per simulated second: one video frame per step plays in real time."""
    import gymnasium as gym

    quiet_mujoco()
    env = gym.make(env_id)
    fps = env.metadata["render_fps"]
    env.close()
    return fps


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--target", type=float, nargs="+", help="return(s) to ask for (default: per env)")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="episode i is reset with seed + i")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--env", help="gymnasium env id (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="one JSON object per target on stdout")
    p.add_argument("--plot", metavar="FILE.png", help="draw achieved against requested return")
    p.add_argument("--video", metavar="FILE.mp4", type=Path,
                   help="render episode 0 of the first target to an MP4 (or .gif) file")
    p.add_argument("--video-seconds", type=float, help="keep only the first seconds of the video "
                   "(default: the whole episode; a short GIF for a web page)")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error("--episodes must be at least 1")
    if args.video_seconds is not None and args.video_seconds <= 0:
        p.error("--video-seconds must be positive")
    for flag, path in (("--plot", args.plot), ("--video", args.video)):
        if path and not Path(path).parent.is_dir():
            p.error(f"{flag} {path}: no such directory: {Path(path).parent}")
    if args.plot:
        require_matplotlib(p)
    if args.video:
        check_video_args(p, args)
    return args


def require_matplotlib(parser):
    try:
        import matplotlib  # noqa: F401  (checked when the arguments are, not after minutes of work)
    except ImportError:
        parser.error("--plot needs matplotlib, which is optional: pip install matplotlib")


def check_video_args(parser, args):
    """Settle the renderer and the file format now, not after minutes of rollouts."""
    if args.video.suffix not in (".mp4", ".gif"):
        parser.error(f"--video {args.video}: the file name must end in .mp4 or .gif")
    backend = offscreen_gl_backend()
    if backend is None:
        tried = os.environ.get("MUJOCO_GL") or "osmesa, egl"
        parser.error(f"--video needs off-screen OpenGL and none works here (tried MUJOCO_GL={tried}): "
                     "install EGL or OSMesa (Debian/Ubuntu: apt install libegl1 or libosmesa6)")
    os.environ["MUJOCO_GL"] = backend  # read by gymnasium's renderer when it makes its context
    if args.video.suffix == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401  (the ffmpeg that imageio writes MP4 with)
        except ImportError:
            args.video = args.video.with_suffix(".gif")
            print(f"no MP4 encoder installed (pip install imageio-ffmpeg): writing {args.video} instead",
                  file=sys.stderr)


def print_sweep(results):
    print(f"\n{'target':>8}  {'achieved (mean ± std)':>22}  {'normalized':>10}")
    for r in results:
        achieved = f"{r['mean_return']:.0f} ± {r['std_return']:.0f}"
        print(f"{r['target']:>8g}  {achieved:>22}  {r['normalized_score']:>10.1f}")


def plot_sweep(results, path, title):
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    targets = [r["target"] for r in results]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.plot(targets, targets, "--", color="grey", label="achieved = requested")
    # Each episode as a dot too: on mixed data a policy often picks one of the behaviours it has
    # seen, and a mean between two clusters describes no episode at all.
    for r in results:
        ax.scatter([r["target"]] * len(r["returns"]), r["returns"], s=10, color="black", alpha=0.3,
                   linewidths=0, label="one episode" if r is results[0] else None)
    ax.errorbar(targets, [r["mean_return"] for r in results], yerr=[r["std_return"] for r in results],
                marker="o", capsize=3, label=f"achieved (mean ± std, {results[0]['episodes']} episodes)")
    ax.set(xlabel="requested return (target)", ylabel="achieved return", title=title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, ckpt = load_checkpoint(args.checkpoint, device)
    env_id = args.env or ckpt["env_id"]
    if body(env_id) != body(ckpt["env_id"]):  # Walker2d and HalfCheetah even share their sizes
        raise CheckpointError(f"{args.checkpoint}: trained in {ckpt['env_id']}, not {env_id}")
    if body(env_id) not in D4RL_REF_RETURNS:
        raise CheckpointError(f"no D4RL reference returns for {env_id!r} (known: {', '.join(D4RL_REF_RETURNS)})")
    targets = args.target or [DEFAULT_TARGETS[body(env_id)]]
    if model.cfg.kind == "bc" and len(targets) > 1:
        print("a BC checkpoint does not condition on a return: evaluating once", file=sys.stderr)
        targets = targets[:1]
    fps = steps_per_second(env_id) if args.video else None
    max_frames = round(args.video_seconds * fps) + 1 if args.video and args.video_seconds else None
    results = []
    for target in targets:
        frames = [] if args.video and not results else None
        try:
            returns = rollout(model, env_id, target, args.episodes, ckpt["state_mean"],
                              ckpt["state_std"], ckpt["reward_scale"], args.seed, device,
                              progress=not args.json, frames=frames, max_frames=max_frames,
                              delayed=ckpt.get("reward_mode") == "delayed")
        except CheckpointError as e:  # the env does not fit this checkpoint: name both
            raise CheckpointError(f"{args.checkpoint}: {e}") from None
        result = {
            "env": env_id, "model": model.cfg.kind, "target": target, "episodes": args.episodes,
            "returns": [round(float(r), 2) for r in returns],
            "mean_return": float(returns.mean()), "std_return": float(returns.std()),
            "normalized_score": normalized_score(env_id, float(returns.mean())),
        }
        asked = f"target {target:g}" if model.cfg.kind == "dt" else "BC (no target)"
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{env_id}  {asked}  ({args.episodes} episodes)")
            print("  returns:", " ".join(f"{r:.1f}" for r in returns))
            print(f"  mean {result['mean_return']:.1f} ± {result['std_return']:.1f}   "
                  f"D4RL normalized score {result['normalized_score']:.1f}")
        results.append(result)
        if frames:
            write_video(frames, args.video, fps)
            print(f"video: {args.video} (episode 0, {asked}: return {returns[0]:.1f})",
                  file=sys.stderr if args.json else sys.stdout)
    if len(results) > 1 and not args.json:
        print_sweep(results)
    if args.plot:
        plot_sweep(results, args.plot, f"{env_id}: {Path(args.checkpoint).name}")
        print(f"plot: {args.plot}", file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
