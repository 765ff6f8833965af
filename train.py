"""
Train a Decision Transformer on D4RL-style trajectories (or a baseline: --model bc, --model iql).

    python train.py --epochs 120                  # halfcheetah-expert-v2, downloaded when missing
    python train.py --data my.hdf5 --max-steps 2000
    python train.py --resume ckpt.pt              # continue an interrupted run exactly
    torchrun --nproc_per_node 2 train.py ...      # data-parallel over 2 processes (GPUs or CPU)

One epoch is one pass over the dataset's timesteps: ceil(N / (batch_size * context_len)) steps
(IQL draws single transitions: ceil(N / batch_size)).
Writes ckpt.pt (model, optimizer, RNG state, config, dataset statistics, step) every --save-every
steps and at the end, and a CSV log beside it (python plot.py ckpt.csv draws it). Ctrl-C saves a
checkpoint and exits.
"""
import argparse
import csv
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

import distributed
import download
import iql
from checkpoint import (FORMAT_VERSION, RunError, StopOnSignal, check_same_data, claim_output,
                        release_output, resolve_device, restore, resume_run, rng_state, save_checkpoint)
from data import load_trajectories, sample_batch, sample_transitions
from datafiles import DataError
from model import DTConfig, build_model, configure_optimizer
from rollout import DEFAULT_TARGETS, body, normalized_score, rollout

DEFAULT_DATA = "data/halfcheetah-expert-v2.hdf5"
# Defaults that depend on --model: the DT paper's for the DT and BC, the IQL paper's for IQL (its
# MuJoCo settings: batch 256, Adam at 3e-4, 2 x 256 MLPs, no weight decay or gradient clipping).
MODEL_DEFAULTS = {
    "dt": dict(batch_size=64, lr=1e-3, n_layer=DTConfig.n_layer, n_embd=DTConfig.n_embd, dropout=DTConfig.dropout,
               weight_decay=1e-4, grad_clip=0.25),
    "iql": dict(batch_size=256, lr=3e-4, n_layer=2, n_embd=256, dropout=0.0, weight_decay=0.0, grad_clip=None,
                expectile=0.7, temperature=3.0, discount=0.99, tau=0.005),
}
MODEL_DEFAULTS["bc"] = MODEL_DEFAULTS["dt"]
LOG_COLUMNS = ["step", "loss", "lr", "elapsed_s", "eval_return", "eval_score"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help=f"HDF5 trajectories (default {DEFAULT_DATA}; a missing D4RL file "
                                  f"data/NAME.hdf5 is downloaded)")
    p.add_argument("--env", help="gymnasium env id (default: from the data file)")
    p.add_argument("--model", default="dt", choices=["dt", "bc", "iql"],
                   help="dt: Decision Transformer; the baselines bc: behaviour cloning (state -> action), "
                        "iql: Implicit Q-Learning (value-based offline RL)")
    p.add_argument("--epochs", type=float, default=120)
    p.add_argument("--max-steps", type=int, help="train this many steps instead of --epochs")
    p.add_argument("--batch-size", type=int, help="default 64; 256 for iql")
    p.add_argument("--lr", type=float, help="default 1e-3; 3e-4 for iql")
    p.add_argument("--weight-decay", type=float, help="default 1e-4; 0 for iql")
    p.add_argument("--grad-clip", type=float, help="default 0.25; none for iql")
    p.add_argument("--context-len", type=int, default=DTConfig.context_len)
    p.add_argument("--n-layer", type=int, help="default 3; 2 for iql")
    p.add_argument("--n-head", type=int, default=DTConfig.n_head)
    p.add_argument("--n-embd", type=int, help="default 128; 256 for iql")
    p.add_argument("--dropout", type=float, help="default 0.1; 0 for iql")
    p.add_argument("--expectile", type=float, help="iql: the expectile V is fitted to (default 0.7)")
    p.add_argument("--temperature", type=float, help="iql: beta in the actor's weights exp(beta (Q - V)) (default 3)")
    p.add_argument("--discount", type=float, help="iql: gamma of the Bellman backups (default 0.99)")
    p.add_argument("--tau", type=float, help="iql: Polyak rate of the target Q networks (default 0.005)")
    p.add_argument("--gamma", type=float, default=1.0, help="discount for returns-to-go (1: the DT paper)")
    p.add_argument("--reward-mode", default="dense", choices=["dense", "delayed"],
                   help="delayed: each episode's rewards all arrive at its last step (the sparse-reward test)")
    p.add_argument("--top-pct", type=float, default=100.0, metavar="X",
                   help="train only on the episodes whose return is in the top X%% (10 with --model bc: 10%% BC)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-amp", action="store_true",
                   help="train in fp32 instead of bf16 autocast (CUDA, and CPUs with bf16 arithmetic)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the training forward (default: on CUDA, off on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ckpt.pt", help="checkpoint path; the CSV log goes beside it")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run's checkpoint at --out")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=1000, help="write the checkpoint every N steps")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate in the env every N steps (0: off)")
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--target", type=float, help="return asked for when evaluating (default: per env)")
    p.add_argument("--resume", metavar="CKPT", help="continue the run saved in CKPT with its own settings")
    args = p.parse_args(argv)
    for name, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_args(p, args)
    if args.resume:
        extra = flags_given(p, argv) - {"resume", "data"}
        if extra:
            p.error("--resume continues a run with the settings it was started with; only --data may "
                    f"come with it, not {', '.join('--' + k.replace('_', '-') for k in sorted(extra))}")
    if args.max_steps:
        args.epochs = None  # the config line shows the budget that counts
    return args


def get_lr(step, total_steps, max_lr):
    """Linear warm-up over the first 10% of steps, then cosine decay to max_lr / 10."""
    warmup = max(1, total_steps // 10)
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return max_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def action_loss(pred, target, mask):
    """Mean squared error over real (unpadded) steps only."""
    m = mask[..., None].to(pred.dtype)
    return ((pred - target) ** 2 * m).sum() / (m.sum() * pred.shape[-1])


def model_config(args, data):
    return DTConfig(kind=args.model, state_dim=data.state_dim, act_dim=data.act_dim, context_len=args.context_len,
                    n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
                    max_ep_len=max(1000, int(data.timesteps.max()) + 1))


def use_bf16(args, device):
    """Train under bf16 autocast unless --no-amp. It speeds up the matmuls on CUDA and on CPUs with
    bf16 arithmetic (AVX512-BF16, AMX: 1.45x per training step on a 2-core Zen 4); any other CPU
    would emulate it, slower than fp32. IQL always trains in fp32: its Bellman targets and
    log-probabilities are sums and differences of large numbers, where bf16's 8 bits of mantissa
    would be noise."""
    if args.no_amp or args.model == "iql":
        return False
    if device.startswith("cuda"):
        return True
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # absent from older torch: fp32
    caps = get_capabilities() if get_capabilities else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def compiles(args, device):
    """--compile, or by default: on CUDA, where the step is launch-bound; off on a CPU, where
    it measured slower for the DT (README, Speed). On a CPU torch.compile builds its kernels
    with a C++ compiler: without one it would fail deep inside its first step."""
    wanted = args.compile if args.compile is not None else device.startswith("cuda")
    if wanted and not device.startswith("cuda") and not shutil.which(os.environ.get("CXX", "g++")):
        raise RunError("--compile on a CPU needs a C++ compiler (g++, or the one $CXX names) to build "
                       "its kernels: install one, or leave out --compile")
    return wanted


def compile_mode(device):
    """On CUDA in one process, "reduce-overhead": a training step is hundreds of small kernels whose
    launches set the pace, and replaying them as CUDA graphs trained a whole 120-epoch run on an
    H200 at 243 steps/s against the default mode's 126 (README, Speed). Under torchrun, the default
    mode: CUDA graphs together with DDP's gradient hooks are unmeasured here and have had known
    crashes (pytorch/pytorch#128218). On a CPU there are no graphs to replay."""
    return "reduce-overhead" if device.startswith("cuda") and not torch.distributed.is_initialized() else None


def setup_training(cfg, args, device):
    """The model, the callable the training forward goes through (compiled with --compile, the
    default on CUDA; wrapped in DDP under torchrun), the optimizer and the autocast context: one
    place, so bench.py measures exactly what train.py runs."""
    model = build_model(cfg).to(device)
    on_cuda = device.startswith("cuda")
    if args.model == "iql":
        optimizer = iql.configure_optimizer(model, args.lr)
        train_model = iql.Objective(model, args)  # its forward is the loss
    else:
        optimizer = configure_optimizer(model, args.lr, args.weight_decay)
        train_model = model
    if compiles(args, device):
        train_model = torch.compile(train_model, mode=compile_mode(device))
    train_model = distributed.wrap(train_model, device)
    # bf16 for the matmuls, fp32 weights and optimizer state; action_loss is taken in fp32.
    amp = torch.autocast("cuda" if on_cuda else "cpu", dtype=torch.bfloat16, enabled=use_bf16(args, device))
    return model, train_model, optimizer, amp


def train_step(model, train_model, optimizer, amp, batch, lr, args):
    """One optimizer step on one batch; returns the loss as a device tensor (no host sync)."""
    for group in optimizer.param_groups:
        group["lr"] = args.lr if group.get("schedule") == "constant" else lr
    if args.model == "iql":
        loss = train_model(*batch)
    else:
        states, actions, rtg, timesteps, mask = batch
        with amp:
            pred = train_model(states, actions, rtg, timesteps, mask)
        loss = action_loss(pred.float(), actions, mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    if args.model == "iql":
        model.update_targets(args.tau)
    return loss.detach()


def sample_and_step(step, total_steps, data, gen, model, train_model, optimizer, amp, args):
    """Draw a batch and take one optimizer step: windows for the DT and BC, transitions for IQL.
    Returns (the loss as a device tensor, the learning rate)."""
    if args.model == "iql":
        lr = iql.actor_lr(step, total_steps, args.lr)
        batch = sample_transitions(data, args.batch_size, gen)
    else:
        lr = get_lr(step, total_steps, args.lr)
        batch = sample_batch(data, args.batch_size, args.context_len, gen)
    return train_step(model, train_model, optimizer, amp, batch, lr, args), lr


def main(argv=None):
    args, saved = parse_args(argv), None
    if args.resume:
        saved, args = resume_run(args, defaults=parse_args([]))
    args.data = args.data or DEFAULT_DATA
    rank, world, device = distributed.init(resolve_device(args.device))
    master = rank == 0  # the one process that prints, logs, evaluates and writes the checkpoint
    say = print if master else (lambda *_: None)
    # Settle the output before any work: a path that cannot be written is found now, not after
    # the first save, and a run still writing there is never clobbered.
    lock = claim_output(args.out, resuming=saved is not None, overwrite=args.overwrite) if master else None
    log_file = None
    try:
        say(f"config: {vars(args)}" + (f"; {world} processes" if world > 1 else ""))
        torch.manual_seed(args.seed)  # the same initial weights in every process
        with distributed.master_first(master):
            data, env_id = load_data(args)
        if saved:
            check_same_data(saved, data, env_id, args)
        data.to(device)  # the whole dataset lives on the training device; batches never cross the bus
        steps_per_batch = args.batch_size * (1 if args.model == "iql" else args.context_len) * world
        steps_per_epoch = math.ceil(data.num_steps / steps_per_batch)
        total_steps = args.max_steps or max(1, round(args.epochs * steps_per_epoch))
        target = args.target if args.target is not None else DEFAULT_TARGETS.get(body(env_id), 0.0)

        cfg = model_config(args, data)
        model, train_model, optimizer, amp = setup_training(cfg, args, device)
        gen = torch.Generator(device=device).manual_seed(args.seed + rank)  # each process its own batches
        start_step, elapsed_before = restore(saved, model, optimizer, gen, args, rank) if saved else (0, 0.0)
        run_info = {"format_version": FORMAT_VERSION, "model_config": asdict(cfg), "env_id": env_id,
                    **{k: v.cpu() if torch.is_tensor(v) else v for k, v in vars(data.norm).items()},
                    "train_args": vars(args), "total_steps": total_steps}
        say(describe_data(args, data, env_id, device))
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)  # not IQL's target networks
        say(f"model: {args.model}, {n_params / 1e6:.2f}M parameters; {total_steps} steps ({steps_per_epoch} per epoch)"
            + (f"; resuming at step {start_step}" if saved else ""))
        if start_step >= total_steps:
            say(f"{args.out} has already finished its {total_steps} steps")
            return

        log_path = Path(args.out).with_suffix(".csv")
        log_file, log = open_log(log_path, start_step if saved else None) if master else (None, None)
        recent = torch.zeros(args.log_every, device=device)  # losses since the last log row, on the device
        n_recent, saved_step = 0, start_step if saved else None
        t0, eval_time = time.time(), 0.0  # elapsed_s in the log is training time, evaluation excluded
        bar = tqdm(desc="train", unit="step", dynamic_ncols=True, initial=start_step, total=total_steps,
                   disable=not master)
        with StopOnSignal() as signals:
            for step in range(start_step, total_steps):
                # sample -> step. The loss stays on the device: no host sync until a log point.
                recent[n_recent], lr = sample_and_step(step, total_steps, data, gen, model, train_model,
                                                       optimizer, amp, args)
                n_recent += 1
                bar.update()

                done = step + 1
                if world == 1:
                    stop = signals.requested
                else:  # agreeing costs a host sync, so the processes agree at log points only
                    stop = done % args.log_every == 0 and distributed.agreed(signals.requested, device)
                finished = done == total_steps or stop
                evaluating = args.eval_every and (done % args.eval_every == 0 or done == total_steps)
                saving = finished or evaluating or done % args.save_every == 0
                if not (saving or done % args.log_every == 0):
                    continue
                # log -> evaluate -> save
                loss_avg = mean_finite_loss(recent[:n_recent].tolist(), done - n_recent + 1, args.out, saved_step)
                n_recent = 0
                if master:
                    row = [done, f"{loss_avg:.5f}", f"{lr:.3g}", "", "", ""]
                    if evaluating:
                        t_eval = time.time()
                        returns = rollout(model, data.norm, env_id, target, args.eval_episodes, progress=False)
                        model.train()
                        row[4:] = [f"{returns.mean():.1f}", f"{normalized_score(env_id, returns.mean()):.1f}"]
                        bar.write(f"step {done}: loss {loss_avg:.4f}  return {returns.mean():.1f} "
                                  f"(normalized {row[5]}) at target {target:g}")
                        eval_time += time.time() - t_eval
                    elapsed = elapsed_before + time.time() - t0 - eval_time
                    row[3] = f"{elapsed:.1f}"
                    if saving:
                        save_checkpoint(args.out, {**run_info, "model": model.state_dict(),
                                                   "optimizer": optimizer.state_dict(), "rng": rng_state(gen),
                                                   "step": done, "elapsed_s": elapsed})
                        saved_step = done
                    log.writerow(row)
                    log_file.flush()
                    bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}")
                # `finished`, not signals.requested: a Ctrl-C that arrives after the save decision
                # above must wait one more step to be saved, not end the run unsaved.
                if finished:
                    break
        bar.close()
        if master:
            report_end(args, world, done, total_steps, saved_step, start_step, elapsed, elapsed_before,
                       loss_avg, log_path)
    finally:
        if log_file:
            log_file.close()
        if lock:
            release_output(lock)


# --- what the loop needs, below it: arguments, data, log, Ctrl-C ---------------------------

def check_args(p, args):
    """Every number a run is given must make sense before anything is loaded or overwritten."""
    for flag, value, low in (("--max-steps", args.max_steps, 1), ("--batch-size", args.batch_size, 1),
                             ("--context-len", args.context_len, 1), ("--n-layer", args.n_layer, 1),
                             ("--n-head", args.n_head, 1), ("--n-embd", args.n_embd, 1),
                             ("--log-every", args.log_every, 1), ("--save-every", args.save_every, 1),
                             ("--eval-every", args.eval_every, 0), ("--eval-episodes", args.eval_episodes, 1)):
        if value is not None and value < low:
            p.error(f"{flag} must be at least {low}, not {value}")
    if not args.epochs > 0:
        p.error(f"--epochs must be above 0, not {args.epochs:g}")
    if not args.lr > 0:
        p.error(f"--lr must be above 0, not {args.lr:g}")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout must be at least 0 and below 1, not {args.dropout:g}")
    if args.model != "iql":
        given = [f"--{k}" for k in ("expectile", "temperature", "discount", "tau") if getattr(args, k) is not None]
        if given:
            p.error(f"{', '.join(given)}: for --model iql only")
    elif not (0 < args.expectile < 1 and args.temperature >= 0 and 0 <= args.discount < 1 and 0 < args.tau <= 1):
        p.error("iql needs 0 < --expectile < 1, --temperature >= 0, 0 <= --discount < 1 and 0 < --tau <= 1")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd ({args.n_embd}) must be a multiple of --n-head ({args.n_head})")
    if not 0 < args.top_pct <= 100:
        p.error("--top-pct must be above 0 and at most 100")


def flags_given(parser, argv):
    """The options written on the command line, as opposed to left at their defaults."""
    unset = object()
    # argparse fills in a default only where the namespace has no value yet.
    blank = argparse.Namespace(**{k: unset for k in vars(parser.parse_args([]))})
    return {k for k, v in vars(parser.parse_args(argv, blank)).items() if v is not unset}


def load_data(args):
    path = download.locate(args.data)  # minari:ID, hf:CONFIG and missing D4RL files are fetched
    data, env_from_file = load_trajectories(path, gamma=args.gamma, reward_mode=args.reward_mode,
                                            top_pct=args.top_pct, transitions=args.model == "iql")
    env_id = args.env or env_from_file
    if env_id is None:
        raise DataError(f"{path}: cannot tell which environment this data is from; pass --env")
    return data, env_id


def describe_data(args, data, env_id, device):
    kept = f" (the best {args.top_pct:g}% of {data.episodes_in_file})" if args.top_pct < 100 else ""
    delayed = ", rewards delayed to each episode's end" if args.reward_mode == "delayed" else ""
    precision = "bf16 autocast" if use_bf16(args, device) else "fp32"
    return (f"data: {args.data}: {data.num_steps} steps in {len(data.episode_returns)} episodes{kept}, "
            f"mean return {data.episode_returns.mean():.1f}{delayed}; env {env_id}; device {device}, {precision}")


def open_log(path, resume_step=None):
    """A fresh CSV log, or on resume the old one cut back to the checkpoint's step (a run killed
    after its last save may have logged steps that will now be trained again)."""
    rows = []
    if resume_step is not None and path.exists():
        with open(path, newline="") as f:
            rows = [r for r in list(csv.reader(f))[1:] if r and r[0].isdigit() and int(r[0]) <= resume_step]
    log_file = open(path, "w", newline="")
    log = csv.writer(log_file)
    log.writerows([LOG_COLUMNS, *rows])
    return log_file, log


def mean_finite_loss(losses, first_step, out, saved_step):
    """Mean of the losses since the last log row. A non-finite one stops the run: the parameters
    it produced are already poisoned, so they must not reach a checkpoint."""
    for i, x in enumerate(losses):
        if not math.isfinite(x):
            kept = f"{out} keeps step {saved_step}" if saved_step else "no checkpoint was written"
            raise RunError(f"the loss became {x} at step {first_step + i}; stopped ({kept}). "
                           f"A lower --lr or --grad-clip may help")
    return sum(losses) / len(losses)


def report_end(args, world, done, total_steps, saved_step, start_step, elapsed, elapsed_before, loss, log_path):
    if done < total_steps:
        launcher = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
        print(f"interrupted: step {saved_step} of {total_steps} saved in {args.out}; "
              f"continue with: {launcher} train.py --resume {args.out}")
        return
    rate = (total_steps - start_step) / (elapsed - elapsed_before)
    print(f"done: {total_steps} steps in {elapsed:.0f}s ({rate:.1f} steps/s), final loss {loss:.4f}, "
          f"checkpoint {args.out}, log {log_path}")


if __name__ == "__main__":
    ok = False
    try:
        main()
        ok = True
    except (DataError, RunError, download.DownloadError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        sys.exit("interrupted; any checkpoint already written is intact")
    finally:
        distributed.finish(leave_together=ok)
