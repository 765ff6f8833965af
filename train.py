"""
Train a Decision Transformer on D4RL-style trajectories.

    python train.py --epochs 120                  # halfcheetah-expert-v2, downloaded when missing
    python train.py --data my.hdf5 --max-steps 2000
    python train.py --resume ckpt.pt              # continue an interrupted run exactly
    python train.py --plot ckpt.csv               # draw a run's log as ckpt.png
    torchrun --nproc_per_node 2 train.py ...      # data-parallel over 2 processes (GPUs or CPU)

One epoch is one pass over the dataset's timesteps: ceil(N / (batch_size * context_len)) steps.
Writes ckpt.pt (model, optimizer, RNG state, config, dataset statistics, step) every --save-every
steps and at the end, and a CSV log beside it. Ctrl-C saves a checkpoint and exits.
"""
import argparse
import csv
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import download
from data import DataError, load_trajectories, sample_batch
from evaluate import (DEFAULT_TARGETS, FORMAT_VERSION, CheckpointError, atomic_write, body,
                      normalized_score, read_checkpoint, require_matplotlib, rollout)
from model import DTConfig, build_model, configure_optimizer

DEFAULT_DATA = "data/halfcheetah-expert-v2.hdf5"
LOG_COLUMNS = ["step", "loss", "lr", "elapsed_s", "eval_return", "eval_score"]


class TrainingError(Exception):
    """A run that cannot go on; the message says why and what was kept."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help=f"HDF5 trajectories (default {DEFAULT_DATA}; a missing D4RL file "
                                  f"data/NAME.hdf5 is downloaded)")
    p.add_argument("--env", help="gymnasium env id (default: from the data file)")
    p.add_argument("--model", default="dt", choices=["dt", "bc"],
                   help="dt: Decision Transformer; bc: behaviour-cloning MLP baseline (state -> action)")
    p.add_argument("--epochs", type=float, default=120)
    p.add_argument("--max-steps", type=int, help="train this many steps instead of --epochs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--grad-clip", type=float, default=0.25)
    p.add_argument("--context-len", type=int, default=DTConfig.context_len)
    p.add_argument("--n-layer", type=int, default=DTConfig.n_layer)
    p.add_argument("--n-head", type=int, default=DTConfig.n_head)
    p.add_argument("--n-embd", type=int, default=DTConfig.n_embd)
    p.add_argument("--dropout", type=float, default=DTConfig.dropout)
    p.add_argument("--gamma", type=float, default=1.0, help="discount for returns-to-go (1: the DT paper)")
    p.add_argument("--reward-mode", default="dense", choices=["dense", "delayed"],
                   help="delayed: each episode's rewards all arrive at its last step (the sparse-reward test)")
    p.add_argument("--top-pct", type=float, default=100.0, metavar="X",
                   help="train only on the episodes whose return is in the top X%% (10 with --model bc: 10%% BC)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-amp", action="store_true",
                   help="train in fp32 instead of bf16 autocast (CUDA, and CPUs with bf16 arithmetic)")
    p.add_argument("--no-compile", action="store_true", help="CUDA: skip torch.compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ckpt.pt", help="checkpoint path; the CSV log goes beside it")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=1000, help="write the checkpoint every N steps")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate in the env every N steps (0: off)")
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--target", type=float, help="return asked for when evaluating (default: per env)")
    p.add_argument("--resume", metavar="CKPT", help="continue the run saved in CKPT with its own settings")
    p.add_argument("--plot", metavar="LOG.csv", type=Path,
                   help="draw a run's log (loss, learning rate, evaluation score) as LOG.png; no training")
    args = p.parse_args(argv)
    if args.plot:
        require_matplotlib(p)
    if args.log_every < 1 or args.save_every < 1:
        p.error("--log-every and --save-every must be at least 1")
    if not 0 < args.top_pct <= 100:
        p.error("--top-pct must be above 0 and at most 100")
    if args.resume:
        extra = flags_given(p, argv) - {"resume", "data"}
        if extra:
            p.error("--resume continues a run with the settings it was started with; only --data may "
                    f"come with it, not {', '.join('--' + k.replace('_', '-') for k in sorted(extra))}")
    return args


def flags_given(parser, argv):
    """The options written on the command line, as opposed to left at their defaults."""
    unset = object()
    # argparse fills in a default only where the namespace has no value yet.
    blank = argparse.Namespace(**{k: unset for k in vars(parser.parse_args([]))})
    return {k for k, v in vars(parser.parse_args(argv, blank)).items() if v is not unset}


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


def init_distributed(device):
    """(rank, world size, device). Under torchrun each process trains one replica and DDP
    averages the gradients (NCCL between GPUs, gloo between CPU processes); alone: (0, 1, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def use_bf16(args, device):
    """Train under bf16 autocast unless --no-amp. It speeds up the matmuls on CUDA and on CPUs with
    bf16 arithmetic (AVX512-BF16, AMX: 1.45x per training step on a 2-core Zen 4); any other CPU
    would emulate it, slower than fp32."""
    if args.no_amp:
        return False
    if device.startswith("cuda"):
        return True
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)  # absent from older torch: fp32
    caps = get_capabilities() if get_capabilities else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def setup_training(cfg, args, device):
    """The model, the callable the training forward goes through (compiled on CUDA, wrapped in DDP
    under torchrun), the optimizer and the autocast context: one place, so bench.py measures
    exactly what train.py runs."""
    model = build_model(cfg).to(device)
    on_cuda = device.startswith("cuda")
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, device_type="cuda" if on_cuda else "cpu")
    train_model = torch.compile(model) if on_cuda and not args.no_compile else model
    if dist.is_initialized():
        train_model = DistributedDataParallel(train_model, device_ids=[device] if on_cuda else None)
    # bf16 for the matmuls, fp32 weights and optimizer state; action_loss is taken in fp32.
    amp = torch.autocast("cuda" if on_cuda else "cpu", dtype=torch.bfloat16,
                         enabled=use_bf16(args, device))
    return model, train_model, optimizer, amp


def train_step(model, train_model, optimizer, amp, batch, lr, grad_clip):
    """One optimizer step on one batch; returns the loss as a device tensor (no host sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    states, actions, rtg, timesteps, mask = batch
    with amp:
        pred = train_model(states, actions, rtg, timesteps, mask)
    loss = action_loss(pred.float(), actions, mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()


def mean_finite_loss(losses, first_step, out, saved_step):
    """Mean of the losses since the last log row. A non-finite one stops the run: the parameters
    it produced are already poisoned, so they must not reach a checkpoint."""
    for i, x in enumerate(losses):
        if not math.isfinite(x):
            kept = f"{out} keeps step {saved_step}" if saved_step else "no checkpoint was written"
            raise TrainingError(f"the loss became {x} at step {first_step + i}; stopped ({kept}). "
                                f"A lower --lr or --grad-clip may help")
    return sum(losses) / len(losses)


def rng_state(generator):
    """Everything random in a step: the batch sampler's generator and the global generators that
    dropout draws from. Saving them is what makes a resumed run continue the same sequence."""
    state = {"sampler": generator.get_state(), "torch": torch.get_rng_state()}
    if generator.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state, generator):
    generator.set_state(state["sampler"].cpu())
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and generator.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu())


def save_checkpoint(path, ckpt):
    # Tensors and plain Python values only, so evaluate.py can load it with weights_only=True.
    # A run killed mid-write leaves the previous checkpoint intact instead of a truncated file.
    with atomic_write(path) as tmp:
        torch.save(ckpt, tmp)


def read_log(path):
    """A training log's rows as {column: list of floats}; blank cells (no evaluation) are NaN."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise TrainingError(f"{path}: {e.strerror.lower()}") from None
    except (UnicodeDecodeError, csv.Error):
        rows = None
    if not rows or any(c not in rows[0] for c in LOG_COLUMNS):
        raise TrainingError(f"{path}: not a training log written by train.py (columns {', '.join(LOG_COLUMNS)})")
    try:
        return {c: [float(r[c]) if r[c] else math.nan for r in rows] for c in LOG_COLUMNS}
    except (TypeError, ValueError):
        raise TrainingError(f"{path}: damaged training log (a cell that is not a number)") from None


def plot_log(path):
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    log = read_log(path)
    evals = [(s, v) for s, v in zip(log["step"], log["eval_score"]) if not math.isnan(v)]
    panels = 3 if evals else 2
    fig, axes = plt.subplots(panels, 1, sharex=True, figsize=(6, 2 * panels + 0.6), dpi=120)
    axes[0].plot(log["step"], log["loss"])
    # The loss falls by an order of magnitude in the first few hundred steps; a log scale keeps
    # the slow part of training, where the policy gets good, readable.
    axes[0].set(yscale="log", ylabel="training loss", title=f"{path.name}: training")
    axes[1].plot(log["step"], log["lr"])
    axes[1].set(ylabel="learning rate")
    if evals:
        axes[2].plot(*zip(*evals), marker="o")
        axes[2].set(ylabel="normalized score")
    axes[-1].set(xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = path.with_suffix(".png")
    with atomic_write(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return out


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


def load_data(args):
    path = Path(args.data)
    if path.exists():
        download.check_recorded_sha256(path)
    elif path.stem in download.DATASETS:
        download.download(path.stem, path)
    data, env_from_file = load_trajectories(path, gamma=args.gamma, reward_mode=args.reward_mode,
                                            top_pct=args.top_pct)
    env_id = args.env or env_from_file
    if env_id is None:
        raise DataError(f"{path}: cannot tell which environment this data is from; pass --env")
    return data, env_id


def resume_run(args):
    """(saved checkpoint, the run's own arguments) for --resume; the run goes on in the same file."""
    saved = read_checkpoint(args.resume)
    if not all(k in saved for k in ("optimizer", "rng", "train_args", "step", "elapsed_s")):
        raise CheckpointError(f"{args.resume}: holds no training state to resume from (only a model)")
    run_args = {**vars(parse_args([])), **saved["train_args"]}
    if not args.data and not Path(run_args["data"]).exists():
        raise CheckpointError(f"{args.resume}: the run's data {run_args['data']} is not there (a path "
                              f"relative to where it started?); say where it is with --data PATH")
    run_args.update(resume=args.resume, out=args.resume, data=args.data or run_args["data"])
    return saved, argparse.Namespace(**run_args)


def check_same_data(saved, data, env_id, args):
    if env_id != saved["env_id"] or not (torch.equal(data.state_mean.cpu(), saved["state_mean"].cpu())
                                         and torch.equal(data.state_std.cpu(), saved["state_std"].cpu())):
        raise CheckpointError(f"{args.resume} was trained on other data than {args.data} "
                              f"({saved['env_id']}, different observation statistics); cannot resume")


def agreed(flag, device):
    """Under torchrun: true on every process if it is true on any. All must stop at the same step,
    or the ones still training would wait for the others' gradients forever."""
    flag = torch.tensor([float(flag)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class StopOnCtrlC:
    """The first Ctrl-C asks the loop to stop after the current step and save; a second one
    interrupts at once (the last checkpoint on disk stays intact either way)."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        print(f"plot: {plot_log(args.plot)}")
        return
    saved = None
    if args.resume:
        saved, args = resume_run(args)
    args.data = args.data or DEFAULT_DATA
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rank, world, device = init_distributed(device)
    master = rank == 0  # the one process that prints, logs, evaluates and writes the checkpoint
    say = print if master else (lambda *_: None)
    say(f"config: {vars(args)}" + (f"; {world} processes" if world > 1 else ""))
    torch.manual_seed(args.seed)  # the same initial weights in every process
    if not master:
        dist.barrier()  # process 0 downloads a missing file first; the others then read it
    data, env_id = load_data(args)
    if master and world > 1:
        dist.barrier()
    if saved:
        check_same_data(saved, data, env_id, args)
    data.to(device)  # the whole dataset lives on the training device; batches never cross the bus
    steps_per_epoch = math.ceil(data.num_steps / (args.batch_size * args.context_len * world))
    total_steps = args.max_steps or max(1, round(args.epochs * steps_per_epoch))
    target = args.target or DEFAULT_TARGETS.get(body(env_id), 0.0)

    cfg = model_config(args, data)
    model, train_model, optimizer, amp = setup_training(cfg, args, device)
    gen = torch.Generator(device=device).manual_seed(args.seed + rank)  # each process its own batches
    start_step, elapsed_before = 0, 0.0
    if saved:
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            set_rng_state(saved["rng"], gen)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{args.resume}: damaged training state ({type(e).__name__})") from None
        start_step, elapsed_before = saved["step"], saved["elapsed_s"]
        if rank > 0:  # the checkpoint holds process 0's sampler state; the others draw afresh
            gen.manual_seed(int(np.random.SeedSequence((args.seed, rank, start_step)).generate_state(1)[0]))
    run_info = {"format_version": FORMAT_VERSION, "model_config": asdict(cfg), "env_id": env_id,
                "state_mean": data.state_mean.cpu(), "state_std": data.state_std.cpu(),
                "reward_scale": data.reward_scale, "reward_mode": args.reward_mode, "train_args": vars(args)}

    kept = f" (the best {args.top_pct:g}% of {data.episodes_in_file})" if args.top_pct < 100 else ""
    delayed = ", rewards delayed to each episode's end" if args.reward_mode == "delayed" else ""
    say(f"data: {args.data}: {data.num_steps} steps in {len(data.episode_returns)} episodes{kept}, "
        f"mean return {data.episode_returns.mean():.1f}{delayed}; env {env_id}; device {device}"
        f"{' (bf16 autocast)' if use_bf16(args, device) else ''}")
    say(f"model: {args.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"{total_steps} steps ({steps_per_epoch} per epoch)" +
          (f"; resuming at step {start_step}" if saved else ""))

    if start_step >= total_steps:
        say(f"{args.out} has already finished its {total_steps} steps")
        return
    log_path = Path(args.out).with_suffix(".csv")
    log_file, log = open_log(log_path, start_step if saved else None) if master else (open(os.devnull, "w"), None)
    recent = torch.zeros(args.log_every, device=device)  # losses since the last log row, on the device
    n_recent, loss_avg, saved_step = 0, float("nan"), start_step if saved else None
    t0, eval_time = time.time(), 0.0  # elapsed_s in the log is training time, evaluation excluded
    bar = tqdm(range(start_step, total_steps), desc="train", unit="step", dynamic_ncols=True,
               initial=start_step, total=total_steps, disable=not master)
    with StopOnCtrlC() as ctrl_c, log_file:
        for step in bar:
            lr = get_lr(step, total_steps, args.lr)
            batch = sample_batch(data, args.batch_size, args.context_len, gen)
            # Kept on the device: no host sync until a log point.
            recent[n_recent] = train_step(model, train_model, optimizer, amp, batch, lr, args.grad_clip)
            n_recent += 1

            done = step + 1
            if world == 1:
                stop = ctrl_c.requested
            else:  # agreeing costs a host sync, so the processes agree at log points only
                stop = done % args.log_every == 0 and agreed(ctrl_c.requested, device)
            finished = done == total_steps or stop
            evaluating = args.eval_every and (done % args.eval_every == 0 or done == total_steps)
            saving = finished or evaluating or done % args.save_every == 0
            if not (saving or done % args.log_every == 0):
                continue
            loss_avg = mean_finite_loss(recent[:n_recent].tolist(), done - n_recent + 1, args.out, saved_step)
            n_recent = 0
            if not master:
                if finished:
                    break
                continue
            row = [done, f"{loss_avg:.5f}", f"{lr:.3g}", "", "", ""]
            if evaluating:
                t_eval = time.time()
                returns = rollout(model, env_id, target, args.eval_episodes, data.state_mean,
                                  data.state_std, data.reward_scale, seed=0, device=device,
                                  progress=False, delayed=args.reward_mode == "delayed")
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
            # `finished`, not ctrl_c.requested: a Ctrl-C that arrives after the save decision
            # above must wait one more step to be saved, not end the run unsaved.
            if finished:
                break
    bar.close()
    if not master:
        return
    if done < total_steps:
        launcher = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
        print(f"interrupted: step {saved_step} of {total_steps} saved in {args.out}; "
              f"continue with: {launcher} train.py --resume {args.out}")
        return
    rate = (total_steps - start_step) / (elapsed - elapsed_before)
    print(f"done: {total_steps} steps in {elapsed:.0f}s ({rate:.1f} steps/s), final loss {loss_avg:.4f}, "
          f"checkpoint {args.out}, log {log_path}")


if __name__ == "__main__":
    try:
        main()
        if dist.is_initialized():
            dist.barrier()  # leave together: a process that quits while another still talks to it aborts
    except (DataError, CheckpointError, TrainingError, download.DownloadError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        sys.exit("interrupted; any checkpoint already written is intact")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
