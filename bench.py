"""
How fast does this code train and evaluate on this machine? Prints a table (or, with --json,
one JSON object) of:

  training   samples/s and steps/s of train.py's own step (model, optimizer, sampler, bf16
             autocast where train.py uses it, torch.compile with --compile, the default on
             CUDA), timed after a warm-up; compile time is reported apart. The DT by default;
             --model names another of train.py's (iql, bc, tt). On a CPU, with dropout, the step
             again with SDPA's own attention, which model.py writes out there instead
  sampler    milliseconds per batch for the batch sampler alone
  evaluation environment steps/s of evaluate.py's rollout with N episodes in parallel (its policy
             compiled with --compile; its environments stepped by --env-workers processes), the
             same policy run one episode at a time, and the vector env stepped alone, with no
             policy: its own ceiling
  memory     peak resident memory after training (CPU) or peak CUDA memory allocated
  roofline   this machine's matmul peak, measured in the same run; the FLOPs of a training step
             and of an evaluation forward (FlopCounterMode on the real model), and the fraction of
             the peak each reaches; the env steps/s that evaluation's forward alone would allow at
             the peak, the ceiling for any exact implementation of this model
  planning   for --model tt, instead of evaluation: seconds a planning step takes for N episodes
             together (one action each, beam search as evaluate.py runs it), env steps/s, and
             the fraction of the peak its FLOPs reach

    python bench.py                                     # data/halfcheetah-expert-v2.hdf5
    python bench.py --synthetic --eval-episodes 1 5 10 20 50 --json
    python bench.py --device cuda --check --steps 300 --eval-episodes 10 100 1000 --env-workers 8   # a GPU's first run
    python bench.py --model tt --eval-episodes 1 10 --beam-width 32 --horizon 5

The model is untrained: speed does not depend on the weights, and an untrained cheetah's
episodes last the same 1000 steps. Numbers are only comparable within one machine and session.
"""
import argparse
import copy
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import train
from common.checkpoint import RunError
from common.datafiles import DataError
from common.device import compiles, evaluates_in_bf16, resolve_device
from common.graphsteps import WARMUP_RUNS
from common.rollout import rollout
from common.tasks import locomotion_task
from common.vecenv import make_envs
from data import load_trajectories
from methods.plan import Planner, PlanSettings, add_planning_flags, check_planning_flags
from model import CausalSelfAttention

TASK = locomotion_task("HalfCheetah-v5")
# The modes --check compiles unless told otherwise. max-autotune-no-cudagraphs is offered too, but
# on an H200 its autotuning of every small matmul was still going after four minutes.
CHECK_MODES = ("default", "reduce-overhead")
CHECK_GRAPH_STEPS = 50  # --check's whole-step mode: steps a replay
COMPILE_MODES = (*CHECK_MODES, "max-autotune-no-cudagraphs")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=train.DEFAULT_DATA, help="HalfCheetah trajectories to train on "
                   "(default: train.py's, python download.py halfcheetah-expert-v2 fetches it)")
    p.add_argument("--model", default="dt", choices=list(train.MODELS), help="whose training step to time "
                   "(default dt); for tt, planning steps instead of rollouts")
    p.add_argument("--synthetic", action="store_true",
                   help="generate random HalfCheetah-shaped data (1000 episodes of 1000 steps) instead")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, default=30, help="timed training steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed training steps first (compile happens here)")
    p.add_argument("--eval-episodes", type=int, nargs="+", default=[10], help="parallel episodes to time")
    p.add_argument("--env-workers", type=int, default=1,
                   help="processes that step the environments in evaluation, as evaluate.py --env-workers")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the training forward, as train.py --compile does (default: on "
                   "CUDA, off on a CPU), and the evaluation policy (CUDA graphs on a GPU)")
    p.add_argument("--no-amp", action="store_true", help="train in fp32, as train.py --no-amp does")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--check", action="store_true",
                   help="check the compiled path instead (for a GPU): eager against each compile mode over "
                        "--steps steps, and evaluation at --eval-episodes; one JSON")
    p.add_argument("--compile-modes", nargs="+", default=list(CHECK_MODES), choices=COMPILE_MODES,
                   help=f"with --check: the torch.compile modes to try (default: {' '.join(CHECK_MODES)})")
    for flag in ("--batch-size", "--context-len", "--n-layer", "--n-head", "--n-embd"):
        p.add_argument(flag, type=int, help="as in train.py (default: train.py's)")
    p.add_argument("--graph-steps", type=int, metavar="K", help="as in train.py: K whole steps a CUDA graph "
                   f"replay; with --check, the whole-step mode's K (default {CHECK_GRAPH_STEPS})")
    add_planning_flags(p, "--model tt")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or min(args.eval_episodes) < 1 or args.env_workers < 1:
        p.error("--steps, --warmup, --eval-episodes and --env-workers must be at least 1")
    if args.graph_steps is not None and args.graph_steps < (1 if args.check else 0):
        p.error(f"--graph-steps must be at least {1 if args.check else 0}")
    if (args.beam_width or args.horizon) and args.model != "tt":
        p.error("--beam-width and --horizon: for --model tt only")
    check_planning_flags(p, args.beam_width, args.horizon)
    if args.check and args.model != "dt":
        p.error("--check compares the DT's compiled paths with its eager one: leave out --model")
    return args


def write_synthetic(path, episodes=1000, length=1000, state_dim=17, act_dim=6, seed=0):
    """Random data of the shape of halfcheetah-expert: what the benchmark costs depends on the
    sizes, not the values."""
    rng = np.random.default_rng(seed)
    n = episodes * length
    timeouts = np.zeros(n, bool)
    timeouts[length - 1::length] = True
    with h5py.File(path, "w") as f:
        f["observations"] = rng.standard_normal((n, state_dim), dtype=np.float32)
        f["actions"] = rng.uniform(-1, 1, (n, act_dim)).astype(np.float32)
        f["rewards"] = rng.uniform(0, 12, n).astype(np.float32)
        f["terminals"] = np.zeros(n, bool)
        f["timeouts"] = timeouts


def train_args(args):
    """train.py's own settings, with the model and batch flags given here."""
    argv = ["--model", args.model, "--device", args.device] + (["--no-amp"] if args.no_amp else [])
    if args.compile is not None:
        argv.append("--compile" if args.compile else "--no-compile")
    for name in ("batch_size", "context_len", "n_layer", "n_head", "n_embd", "graph_steps"):
        if getattr(args, name) is not None:
            argv += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return train.parse_args(argv)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def whole_runs(warmup, steps, k):
    """(warm-up, timed) step counts in whole K-step runs, the warm-up covering the eager runs that
    come before a graph is recorded."""
    warmup = max(warmup, (WARMUP_RUNS + 1) * k)
    return -(-warmup // k) * k, -(-steps // k) * k


def timed_steps(model, objective, optimizer, data, targs, device, steps, warmup, seed=0):
    """train.py's own steps (train.training_steps: one at a time, or --graph-steps K at a time),
    `warmup` untimed and then `steps` timed. Returns (warm-up seconds, seconds a step, losses)."""
    recipe, k = train.MODELS[targs.model], targs.graph_steps or 1
    if k > 1:
        warmup, steps = whole_runs(warmup, steps, k)
    gen = torch.Generator(device=device).manual_seed(seed)
    run_steps = train.training_steps(recipe, model, objective, optimizer, data, targs, gen, warmup + steps, device)

    def run(first, n):
        losses = [run_steps(s, min(k, first + n - s)) for s in range(first, first + n, k)]
        sync(device)
        return losses

    t0 = time.perf_counter()
    run(0, warmup)  # includes torch.compile's tracing and code generation when compiling
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = torch.cat(run(warmup, steps))
    return warmup_s, (time.perf_counter() - t0) / steps, losses


def new_training(data, targs, device):
    """(model, objective, optimizer), freshly built as train.py builds them."""
    cfg = (train.MODELS[targs.model].config or train.model_config)(targs, data)
    return train.setup_training(cfg, targs, device)


def bench_training(data, targs, device, steps, warmup):
    recipe = train.MODELS[targs.model]
    model, objective, optimizer = new_training(data, targs, device)
    warmup_s, step_s, _ = timed_steps(model, objective, optimizer, data, targs, device, steps, warmup)
    gen = torch.Generator(device=device).manual_seed(0)

    t0 = time.perf_counter()
    for _ in range(steps * 10):
        recipe.sample(data, targs, gen)
    sync(device)
    sampler_s = (time.perf_counter() - t0) / (steps * 10)
    return model, objective, optimizer, warmup_s, step_s, sampler_s


def sdpa_step_seconds(data, targs, device, steps, warmup):
    """Seconds a training step takes with SDPA's own attention where model.py writes it out (in
    training on a CPU, with dropout): the step that path is there to beat. None elsewhere."""
    if device != "cpu" or not targs.dropout:
        return None
    CausalSelfAttention.written_out_on_cpu = False
    try:
        return timed_steps(*new_training(data, targs, device), data, targs, device, steps, warmup)[1]
    finally:
        CausalSelfAttention.written_out_on_cpu = True


def matmul_peak_gflops(device, dtype, n=1024, reps=20):
    """This machine's dense matrix-product rate in `dtype`, measured now: the ceiling the training
    and evaluation steps are held against (nanoGPT's estimate_mfu assumes an A100's; this measures)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def counted_flops(fn):
    """FLOPs of the matrix products (matmuls, attention) that one call of fn runs, forward and
    backward, as torch's FlopCounterMode counts them on the real model."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def train_step_flops(model, objective, optimizer, data, targs):
    batch = train.MODELS[targs.model].sample(data, targs, torch.Generator(device=data.states.device))
    return counted_flops(lambda: train.train_step(model, objective, optimizer, batch, targs))


def eval_forward_flops(model, episodes, device):
    """One evaluation step's forward: get_action on a full K-step window for every episode."""
    K, S, A = model.cfg.context_len, model.cfg.state_dim, model.cfg.act_dim
    window = (torch.zeros(episodes, K, S, device=device), torch.zeros(episodes, K, A, device=device),
              torch.zeros(episodes, K, 1, device=device), torch.arange(K, device=device).expand(episodes, K))
    return counted_flops(lambda: model.get_action(*window))


def env_steps_per_s(model, data, episodes, compile, workers, runs=1, bf16=False):
    """Environment steps per second over `runs` calls of rollout with `episodes` in parallel.
    HalfCheetah never ends an episode early, so each one is exactly 1000 steps. A compiled policy
    is compiled (and its CUDA graphs recorded) in one rollout first, not timed."""
    def run(seed):
        rollout(model, data.norm, TASK, TASK.default_target, episodes, seed=seed, progress=False,
                compile=compile, env_workers=workers, bf16=bf16)
    if compile:
        run(seed=runs)
    t0 = time.perf_counter()
    for i in range(runs):
        run(seed=i)
    return runs * episodes * 1000 / (time.perf_counter() - t0)


def env_only_steps_per_s(episodes, workers, steps=200):
    """The vector env alone, stepped with zero actions by `workers` processes: how fast evaluation
    could go if the policy cost nothing."""
    envs = make_envs(TASK, episodes, workers=workers)
    envs.reset(seed=0)
    zeros = np.zeros((episodes, *envs.single_action_space.shape), np.float32)
    t0 = time.perf_counter()
    for _ in range(steps):
        envs.step(zeros)
    rate = episodes * steps / (time.perf_counter() - t0)
    envs.close()
    return rate


def planning_step_seconds(model, data, episodes, settings, device, steps=3):
    """Seconds a TT planning step takes for `episodes` HalfCheetahs together (each gets one
    action), over `steps` steps after an untimed first one; and the FLOPs of one step."""
    envs = make_envs(TASK, episodes)
    obs, _ = envs.reset(seed=0)
    planner = Planner(model, data.norm, episodes, settings, device)

    def step(obs):
        action = planner.act(data.norm.states(torch.as_tensor(obs, dtype=torch.float32, device=device)), None, 0)
        obs, reward, *_ = envs.step(action.float().cpu().numpy())
        planner.observe(reward)
        return obs

    with torch.no_grad():
        obs = step(obs)
        t0 = time.perf_counter()
        for _ in range(steps):
            obs = step(obs)
        seconds = (time.perf_counter() - t0) / steps
        flops = counted_flops(lambda: step(obs))
    envs.close()
    return seconds, flops


def attention_line(step_s, sdpa_s):
    return (f"          attention written out (model.attention_with_dropout): {sdpa_s / step_s:.2f}x as fast "
            f"as the step with SDPA's own, {1 / sdpa_s:.2f} steps/s")


def report_planning(args, model, data, device, bf16, targs, step_s, sdpa_s, warmup_s, step_flops, peak_mb, say):
    """The TT's half of the table: its training step (and, where model.py writes attention out,
    with SDPA's own), and planning in place of rollouts."""
    settings = PlanSettings.given(args.beam_width, args.horizon)
    peak = matmul_peak_gflops(device, torch.bfloat16 if bf16 else torch.float32)
    peak_fp32 = peak if not bf16 else matmul_peak_gflops(device, torch.float32)
    planning = {n: planning_step_seconds(model, data, n, settings, device) for n in args.eval_episodes}
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": "tt", "train_samples_per_s": targs.batch_size / step_s, "train_steps_per_s": 1 / step_s,
        "train_steps_per_s_sdpa_attention": sdpa_s and 1 / sdpa_s,
        "warmup_s": warmup_s, "bf16": bf16, "peak_mem_mb": peak_mb, "peak_gflops": peak,
        "peak_gflops_fp32": peak_fp32, "train_step_gflop": step_flops / 1e9,
        "train_flop_fraction": step_flops / step_s / (peak * 1e9),
        "beam_width": settings.beam_width, "horizon": settings.horizon,
        "plan_seconds_per_step_by_episodes": {n: s for n, (s, _) in planning.items()},
        "plan_env_steps_per_s_by_episodes": {n: n / s for n, (s, _) in planning.items()},
        # Planning runs in fp32.
        "plan_gflop_by_episodes": {n: f / 1e9 for n, (_, f) in planning.items()},
        "plan_flop_fraction_by_episodes": {n: f / s / (peak_fp32 * 1e9) for n, (s, f) in planning.items()},
    }
    if args.json:
        print(json.dumps(result))
        return result
    say(f"train     {result['train_samples_per_s']:9.1f} samples/s  {result['train_steps_per_s']:7.2f} steps/s"
        f"   ({result['train_step_gflop']:.1f} GFLOP a step, {100 * result['train_flop_fraction']:.0f}% of the "
        f"{'bf16' if bf16 else 'fp32'} peak of {peak:.0f} GFLOP/s)")
    if sdpa_s:
        say(attention_line(step_s, sdpa_s))
    for n, (seconds, flops) in planning.items():
        say(f"plan      {seconds:9.2f} s a step for {n} episode{'s' if n > 1 else ''} together, "
            f"{n / seconds:.1f} env steps/s (beam {settings.beam_width}, horizon {settings.horizon}; "
            f"{flops / 1e9:.1f} GFLOP, {100 * result['plan_flop_fraction_by_episodes'][n]:.0f}% of the fp32 peak "
            f"of {peak_fp32:.0f} GFLOP/s)")
    say(f"memory    {peak_mb:9.0f} MB peak {'CUDA allocated' if device == 'cuda' else 'resident (RSS)'}")
    return result


def check(args, data, device):
    """The compiled training paths checked against eager and timed: each compile mode, and the
    whole step recorded as one CUDA graph (--graph-steps K, its objective compiled in the default
    mode). The same seed, batches and schedule, so the losses must agree (to the rounding of fused
    kernels and another dropout stream); each with the time the full --epochs 120 run on this
    data would take at its rate. Then evaluation with many episodes in parallel, eager and
    compiled (CUDA graphs on a GPU), and the vector env alone, in one process and in
    --env-workers. Returns one dict."""
    targs = train_args(args)
    targs.compile, targs.graph_steps = False, 0  # each mode is set up here, not by setup_training
    cfg = train.model_config(targs, data)
    k = args.graph_steps or CHECK_GRAPH_STEPS
    # Every mode runs the steps the whole-step mode runs: its warm-up is K-step runs.
    warmup, steps = whole_runs(args.warmup, args.steps, k)
    epochs_120 = 120 * math.ceil(data.num_steps / (targs.batch_size * targs.context_len))
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "bf16": train.use_bf16(targs, device), "steps": steps, "graph_steps": k,
              "epochs_120_steps": epochs_120}
    modes = ("eager", *args.compile_modes, "whole-step graph")
    for mode in modes:
        torch.manual_seed(0)
        mode_args = copy.copy(targs)
        mode_args.graph_steps = k if mode == "whole-step graph" else 0
        model, objective, optimizer = train.setup_training(cfg, mode_args, device)
        if mode != "eager":
            objective = torch.compile(objective, mode=mode if mode in COMPILE_MODES[1:] else None)
        warmup_s, step_s, losses = timed_steps(model, objective, optimizer, data, mode_args, device, steps, warmup)
        result[mode] = {"warmup_s": warmup_s, "steps_per_s": 1 / step_s, "epochs_120_s": epochs_120 * step_s,
                        "loss": losses[-max(1, steps // 5):].mean().item()}
    eager = result["eager"]["loss"]
    result["max_loss_gap"] = max(abs(result[m]["loss"] - eager) / eager for m in modes[1:])
    model.eval()
    workers = result["env_workers"] = args.env_workers
    result["eval_env_steps_per_s_by_episodes"] = {n: env_steps_per_s(model, data, n, False, workers)
                                                  for n in args.eval_episodes}
    result["eval_compiled_env_steps_per_s_by_episodes"] = {n: env_steps_per_s(model, data, n, True, workers)
                                                           for n in args.eval_episodes}
    result["env_only_steps_per_s_by_episodes"] = {n: env_only_steps_per_s(n, 1) for n in args.eval_episodes}
    if workers > 1:
        result["env_only_steps_per_s_by_episodes_workers"] = {n: env_only_steps_per_s(n, workers)
                                                              for n in args.eval_episodes}
    return result


def peak_memory_mb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    targs = train_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "halfcheetah-synthetic.hdf5" if args.synthetic else Path(args.data)
        if args.synthetic:
            write_synthetic(path)
        elif not path.exists():
            raise DataError(f"{path}: no such file; download it with python download.py halfcheetah-expert-v2, "
                            f"point --data at a HalfCheetah file, or time random data with --synthetic")
        data, task = load_trajectories(path)
    if task not in (None, TASK) or data.state_dim != 17:
        raise DataError(f"{path}: bench.py measures HalfCheetah; this is {task.env_id if task else 'other'} data")
    data.to(device)
    if train.MODELS[targs.model].prepare:  # the TT's tokens and bins
        train.MODELS[targs.model].prepare(data, targs)
    if args.check:
        result = check(args, data, device)
        print(json.dumps(result))
        return result
    bf16 = train.use_bf16(targs, device)
    say = (lambda *a: None) if args.json else print
    say(f"bench: {path.name if not args.synthetic else 'synthetic'} ({data.num_steps} steps), "
        f"{TASK.env_id}, device {device}, {torch.get_num_threads()} threads, batch {targs.batch_size}, "
        f"{targs.model}{'' if targs.model == 'tt' else f', K {targs.context_len}'}, {targs.n_layer} layers x "
        f"{targs.n_embd}, training in {'bf16' if bf16 else 'fp32'}")

    model, objective, optimizer, warmup_s, step_s, sampler_s = bench_training(
        data, targs, device, args.steps, args.warmup)
    peak_mb = peak_memory_mb(device)
    step_flops = train_step_flops(model, objective, optimizer, data, targs)
    sdpa_s = sdpa_step_seconds(data, targs, device, args.steps, args.warmup)
    model.eval()
    if targs.model == "tt":
        return report_planning(args, model, data, device, bf16, targs, step_s, sdpa_s, warmup_s, step_flops,
                               peak_mb, say)
    compiled = compiles(targs.compile, device)
    workers = args.env_workers
    # Evaluation as evaluate.py runs it: in the training's precision where that pays
    # (device.evaluates_in_bf16), and then in fp32 as well, for the ratio.
    eval_bf16 = evaluates_in_bf16(bf16, device)
    curve = {n: env_steps_per_s(model, data, n, compiled, workers, bf16=eval_bf16) for n in args.eval_episodes}
    curve_fp32 = {n: env_steps_per_s(model, data, n, compiled, workers) for n in args.eval_episodes} if eval_bf16 else curve
    sequential = env_steps_per_s(model, data, 1, compiled, workers=1, runs=2, bf16=eval_bf16)
    env_only = {n: env_only_steps_per_s(n, workers) for n in args.eval_episodes}
    peak = matmul_peak_gflops(device, torch.bfloat16 if bf16 else torch.float32)
    peak_fp32 = peak if not bf16 else matmul_peak_gflops(device, torch.float32)
    peak_eval = peak if eval_bf16 else peak_fp32
    forward_flops = {n: eval_forward_flops(model, n, device) for n in args.eval_episodes}
    # A step of n episodes is one forward for all of them, so env steps/s = forwards/s * n.
    eval_fraction = {n: forward_flops[n] * curve[n] / n / (peak_eval * 1e9) for n in args.eval_episodes}
    ceiling = {n: peak_eval * 1e9 / (forward_flops[n] / n) for n in args.eval_episodes}

    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "train_samples_per_s": targs.batch_size / step_s,
        "train_steps_per_s": 1 / step_s,
        "warmup_s": warmup_s,
        "compiled": compiled,
        "bf16": bf16,
        "train_steps_per_s_sdpa_attention": sdpa_s and 1 / sdpa_s,
        "sampler_ms_per_batch": sampler_s * 1e3,
        "sampler_share_of_step": sampler_s / step_s,
        "eval_episodes": max(args.eval_episodes),
        "env_workers": workers,
        "eval_env_steps_per_s": curve[max(args.eval_episodes)],
        "eval_env_steps_per_s_by_episodes": curve,
        "eval_bf16": eval_bf16,
        "eval_fp32_env_steps_per_s_by_episodes": curve_fp32,
        "eval_env_steps_per_s_sequential": sequential,
        "env_only_steps_per_s_by_episodes": env_only,
        "peak_mem_mb": peak_mb,
        "peak_gflops": peak,
        "peak_gflops_fp32": peak_fp32,
        "train_step_gflop": step_flops / 1e9,
        "train_flop_fraction": step_flops / step_s / (peak * 1e9),
        "eval_forward_gflop_by_episodes": {n: f / 1e9 for n, f in forward_flops.items()},
        "eval_flop_fraction": eval_fraction[max(args.eval_episodes)],
        "eval_flop_fraction_by_episodes": eval_fraction,
        "eval_env_steps_per_s_ceiling_by_episodes": ceiling,
    }
    if args.json:
        print(json.dumps(result))
        return result
    print(f"train     {result['train_samples_per_s']:9.1f} samples/s  {result['train_steps_per_s']:7.2f} steps/s"
          f"   (warm-up of {args.warmup} steps{', with compile,' if result['compiled'] else ''} took {warmup_s:.1f} s)")
    if sdpa_s:
        print(attention_line(step_s, sdpa_s))
    print(f"sampler   {result['sampler_ms_per_batch']:9.3f} ms/batch   "
          f"{100 * result['sampler_share_of_step']:.1f}% of a training step")
    for n, rate in curve.items():
        print(f"eval      {rate:9.0f} env steps/s with {n} episode{'s' if n > 1 else ''} in parallel, "
              f"{'bf16' if eval_bf16 else 'fp32'} (the env alone: {env_only[n]:,.0f}"
              f"{f', {workers} processes' if workers > 1 else ''}"
              f"{f'; in fp32 {curve_fp32[n]:,.0f}, bf16 {rate / curve_fp32[n]:.2f}x' if eval_bf16 else ''})")
    print(f"eval      {sequential:9.0f} env steps/s one episode at a time ({result['eval_episodes']} in "
          f"parallel: {result['eval_env_steps_per_s'] / sequential:.1f}x as fast)")
    print(f"memory    {peak_mb:9.0f} MB peak {'CUDA allocated' if device == 'cuda' else 'resident (RSS)'}")
    print(f"roofline  {peak:9.0f} GFLOP/s matmul peak here in {'bf16' if bf16 else 'fp32'}"
          + (f", {peak_fp32:.0f} in fp32" if bf16 else ""))
    print(f"          training: {result['train_step_gflop']:.2f} GFLOP a step, "
          f"{100 * result['train_flop_fraction']:.0f}% of the peak")
    for n in args.eval_episodes:
        print(f"          evaluation, {n} in parallel: {100 * eval_fraction[n]:.0f}% of the "
              f"{'bf16' if eval_bf16 else 'fp32'} peak; at the peak "
              f"the forward alone would allow {ceiling[n]:,.0f} env steps/s")
    return result


if __name__ == "__main__":
    try:
        main()
    except (DataError, RunError) as e:
        sys.exit(f"error: {e}")
