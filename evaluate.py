"""
Roll a trained Decision Transformer out in its MuJoCo environment, asking it for a target return.

    python evaluate.py ckpt.pt --target 6000
    python evaluate.py ckpt.pt --target 6000 12000 --episodes 10 --json
    python evaluate.py ckpt.pt --target 0 4000 8000 12000 --plot sweep.png
    python evaluate.py ckpt.pt --target 12000 --video cheetah.mp4
    python evaluate.py ckpt.pt --episodes 1000 --env-workers 8 --device cuda
    python evaluate.py maze.pt --episodes 20        # a maze, in the evaluation its data file named

At every step of an episode the model sees the last K (return-to-go, state, action) steps and
picks the next action. The return-to-go starts at the target and counts down by each reward
collected (data.Normalization.return_to_go), so the model is always asked for what is still
missing, exactly as its training data was labelled. common/rollout.py runs the episodes side by side.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from common.checkpoint import MODEL_KINDS, RunError, load_checkpoint
from common.device import evaluates_in_bf16, resolve_device
from common.rollout import rollout
from common.tasks import task_from_checkpoint


MANY_EPISODES = 100  # from here on the environments, stepped one by one, cost more than the policy


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--target", type=float, nargs="+", help="return(s) to ask for (default: per env)")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="episode i is reset with seed + i")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--env-workers", type=int, help="processes that step the environments, which pays off "
                   "with hundreds of episodes, where stepping them takes longer than the policy (default: "
                   f"one per CPU core from {MANY_EPISODES} episodes on, else none)")
    p.add_argument("--env", help="gymnasium env id (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="one JSON object per target on stdout")
    p.add_argument("--plot", metavar="FILE.png", help="draw achieved against requested return")
    p.add_argument("--video", metavar="FILE.mp4", type=Path,
                   help="render episode 0 of the first target to an MP4 (or .gif) file")
    p.add_argument("--video-seconds", type=float, help="keep only the first seconds of the video "
                   "(default: the whole episode; a short GIF for a web page)")
    p.add_argument("--beam-width", type=int, help="a TT checkpoint: plans kept per step (default 128, the paper's)")
    p.add_argument("--horizon", type=int, help="a TT checkpoint: transitions planned ahead (default 15, the "
                   "paper's; it uses 5 for HalfCheetah and Walker2d)")
    args = p.parse_args(argv)
    for flag, value in (("--beam-width", args.beam_width), ("--horizon", args.horizon)):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1, not {value}")
    if args.episodes < 1 or (args.env_workers is not None and args.env_workers < 1):
        p.error("--episodes and --env-workers must be at least 1")
    if args.video_seconds is not None and args.video_seconds <= 0:
        p.error("--video-seconds must be positive")
    for flag, path in (("--plot", args.plot), ("--video", args.video)):
        if path and not Path(path).parent.is_dir():
            p.error(f"{flag} {path}: no such directory: {Path(path).parent}")
    if args.plot:
        from study.plot import require_matplotlib
        require_matplotlib(p, "--plot")
    if args.video and (args.env_workers or 1) > 1:
        p.error("--video records its episode in this process: leave out --env-workers")
    if args.env_workers is None:
        args.env_workers = len(os.sched_getaffinity(0)) if args.episodes >= MANY_EPISODES and not args.video else 1
    if args.video:
        from common.video import check_video_path
        args.video = check_video_path(p, args.video)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    model, norm, ckpt = load_checkpoint(args.checkpoint, device)
    task = task_from_checkpoint(ckpt)
    if args.env:  # another version of the same body: Walker2d and HalfCheetah even share their sizes
        if args.env.split("-")[0] != task.body:
            raise RunError(f"{args.checkpoint}: trained in {task.env_id}, not {args.env}")
        task = replace(task, env_id=args.env)
    if task.ref_returns is None:
        raise RunError(f"no reference returns to normalize {task.env_id!r} scores with (D4RL's bodies "
                       f"and maze files that carry ref_min_score / ref_max_score have them)")
    planning = model.cfg.kind == "tt"
    if not planning and (args.beam_width or args.horizon):
        raise RunError(f"{args.checkpoint}: --beam-width and --horizon are for a TT checkpoint; this is "
                       f"{model.cfg.kind.upper()}")
    # In the training's precision where that pays; checkpoints from before it was recorded, in fp32.
    # A plan is searched in fp32: its beams are ranked by sums of predicted rewards and values.
    bf16 = evaluates_in_bf16(ckpt.get("bf16", False), device) and not planning
    conditioned = MODEL_KINDS[model.cfg.kind].conditioned
    if conditioned:
        targets = args.target or [task.default_target]
    else:  # it acts on the state (and its history) alone: there is no return to ask for, nor to record
        if args.plot:
            raise RunError(f"--plot draws the return achieved against the return asked for; a "
                           f"{model.cfg.kind.upper()} checkpoint is asked for none")
        if args.target:
            print(f"a {model.cfg.kind.upper()} checkpoint does not condition on a return: --target ignored",
                  file=sys.stderr)
        targets = [None]
    out = sys.stderr if args.json else sys.stdout  # with --json, stdout holds only the JSON lines
    results = []
    for target in targets:
        recorder = None
        if args.video and not results:
            from common.video import Recorder
            recorder = Recorder(args.video_seconds)
        t0 = time.perf_counter()
        try:
            returns, lengths, policy = rollout(
                model, norm, task, target, args.episodes, args.seed, progress=not args.json, recorder=recorder,
                env_workers=args.env_workers, planning={"beam_width": args.beam_width, "horizon": args.horizon},
                bf16=bf16)
        except RunError as e:  # the env does not fit this checkpoint: name both
            raise RunError(f"{args.checkpoint}: {e}") from None
        seconds, steps = time.perf_counter() - t0, int(lengths.max())
        result = {
            "env": task.env_id, "model": model.cfg.kind, "target": target, "episodes": args.episodes,
            "returns": [round(float(r), 2) for r in returns], "lengths": lengths.tolist(),
            "mean_return": float(returns.mean()), "std_return": float(returns.std()),
            "normalized_score": task.normalized_score(float(returns.mean())),
            "ref_returns": list(task.ref_returns), "policy": policy, "precision": "bf16" if bf16 else "fp32",
            # One policy call acts for every episode at once: a step of all of them.
            "seconds_per_step": seconds / steps,
            "env_steps_per_s": args.episodes * steps / seconds,
        }
        if planning:
            result.update(beam_width=args.beam_width, horizon=args.horizon)
        results.append(result)
        asked = policy if conditioned or planning else f"{model.cfg.kind.upper()}, {policy}"
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print_result(result, returns, asked)
        if recorder:
            recorder.write(args.video)
            print(f"video: {args.video} (episode 0, {asked}: return {returns[0]:.1f})", file=out)
    if len(results) > 1 and not args.json:
        print_sweep(results)
    if args.plot:
        from study.plot import plot_sweep
        plot_sweep(results, args.plot, f"{task.env_id}: {Path(args.checkpoint).name}")
        print(f"plot: {args.plot}", file=out)


def print_result(r, returns, asked):
    print(f"{r['env']}  {asked}  ({r['episodes']} episode{'s' if r['episodes'] > 1 else ''})")
    print("  returns:", " ".join(f"{x:.1f}" for x in returns))
    print("  lengths:", " ".join(str(n) for n in r["lengths"]))
    print(f"  mean {r['mean_return']:.1f} ± {r['std_return']:.1f}   "
          f"D4RL normalized score {r['normalized_score']:.1f}")
    if r["model"] == "tt":
        print(f"  planning: {r['seconds_per_step']:.2f} s a step for all {r['episodes']} episodes together, "
              f"{r['env_steps_per_s']:.1f} env steps/s")


def print_sweep(results):
    print(f"\n{'target':>8}  {'achieved (mean ± std)':>22}  {'normalized':>10}")
    for r in results:
        achieved = f"{r['mean_return']:.0f} ± {r['std_return']:.0f}"
        print(f"{r['target']:>8g}  {achieved:>22}  {r['normalized_score']:>10.1f}")


if __name__ == "__main__":
    try:
        main()
    except RunError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted")
