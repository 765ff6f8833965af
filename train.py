"""
Train a Decision Transformer on D4RL-style trajectories.

    python train.py --epochs 120                  # halfcheetah-expert-v2, downloaded when missing
    python train.py --data my.hdf5 --max-steps 2000

One epoch is one pass over the dataset's timesteps: ceil(N / (batch_size * context_len)) steps.
Writes ckpt.pt (model, optimizer, config, dataset statistics, step) and a CSV log beside it.
"""
import argparse
import csv
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

import download
from data import DataError, load_trajectories, sample_batch
from evaluate import (DEFAULT_TARGETS, FORMAT_VERSION, CheckpointError, body, normalized_score,
                      rollout)
from model import DecisionTransformer, DTConfig, configure_optimizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/halfcheetah-expert-v2.hdf5",
                   help="HDF5 trajectories; a missing D4RL file (data/NAME.hdf5) is downloaded")
    p.add_argument("--env", help="gymnasium env id (default: from the data file)")
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
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-amp", action="store_true", help="CUDA: train in fp32 instead of bf16 autocast")
    p.add_argument("--no-compile", action="store_true", help="CUDA: skip torch.compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ckpt.pt", help="checkpoint path; the CSV log goes beside it")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=0, help="evaluate in the env every N steps (0: off)")
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--target", type=float, help="return asked for when evaluating (default: per env)")
    return p.parse_args(argv)


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


def save_checkpoint(path, model, optimizer, cfg, data, env_id, args, step):
    ckpt = {
        "format_version": FORMAT_VERSION,
        "model": model.state_dict(),
        "model_config": asdict(cfg),
        "optimizer": optimizer.state_dict(),
        "state_mean": data.state_mean, "state_std": data.state_std, "reward_scale": data.reward_scale,
        "env_id": env_id,
        "train_args": vars(args),
        "step": step,
    }
    # Write beside the target and rename: os.replace is atomic, so a run killed mid-write leaves
    # the previous checkpoint intact instead of a truncated file.
    tmp = Path(str(path) + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_data(args):
    path = Path(args.data)
    if not path.exists() and path.stem in download.DATASETS:
        download.download(path.stem, path)
    data, env_from_file = load_trajectories(path, gamma=args.gamma)
    env_id = args.env or env_from_file
    if env_id is None:
        raise DataError(f"{path}: cannot tell which environment this data is from; pass --env")
    return data, env_id


def main(argv=None):
    args = parse_args(argv)
    print(f"config: {vars(args)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.manual_seed(args.seed)
    data, env_id = load_data(args)
    data.to(device)  # the whole dataset lives on the training device; batches never cross the bus
    steps_per_epoch = math.ceil(data.num_steps / (args.batch_size * args.context_len))
    total_steps = args.max_steps or max(1, round(args.epochs * steps_per_epoch))
    target = args.target or DEFAULT_TARGETS.get(body(env_id), 0.0)

    cfg = DTConfig(state_dim=data.state_dim, act_dim=data.act_dim, context_len=args.context_len,
                   n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
                   max_ep_len=max(1000, int(data.timesteps.max()) + 1))
    model = DecisionTransformer(cfg).to(device)
    optimizer = configure_optimizer(model, args.lr, args.weight_decay, device_type=device)
    use_cuda = device == "cuda"
    train_model = torch.compile(model) if use_cuda and not args.no_compile else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda and not args.no_amp)
    gen = torch.Generator(device=device).manual_seed(args.seed)

    print(f"data: {args.data}: {data.num_steps} steps in {len(data.episode_returns)} episodes, "
          f"mean return {data.episode_returns.mean():.1f}; env {env_id}; device {device}")
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
          f"{total_steps} steps ({steps_per_epoch} per epoch)")

    log_path = Path(args.out).with_suffix(".csv")
    log_file = open(log_path, "w", newline="")
    log = csv.writer(log_file)
    log.writerow(["step", "loss", "lr", "elapsed_s", "eval_return", "eval_score"])
    loss_sum, loss_count, loss_avg = torch.zeros((), device=device), 0, float("nan")
    t0, eval_time = time.time(), 0.0  # elapsed_s in the log is training time, evaluation excluded
    bar = tqdm(range(total_steps), desc="train", unit="step", dynamic_ncols=True)
    for step in bar:
        lr = get_lr(step, total_steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        states, actions, rtg, timesteps, mask = sample_batch(data, args.batch_size, args.context_len, gen)
        with amp:
            pred = train_model(states, actions, rtg, timesteps, mask)
        loss = action_loss(pred.float(), actions, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        loss_sum += loss.detach()  # stays on the device: no host sync until a log point
        loss_count += 1

        last = step + 1 == total_steps
        evaluating = args.eval_every and ((step + 1) % args.eval_every == 0 or last)
        if (step + 1) % args.log_every == 0 or last or evaluating:
            loss_avg = loss_sum.item() / loss_count
            loss_sum.zero_()
            loss_count = 0
            row = [step + 1, f"{loss_avg:.5f}", f"{lr:.3g}", f"{time.time() - t0 - eval_time:.1f}", "", ""]
            if evaluating:
                t_eval = time.time()
                returns = rollout(model, env_id, target, args.eval_episodes, data.state_mean,
                                  data.state_std, data.reward_scale, seed=0, device=device,
                                  progress=False)
                model.train()
                row[4:] = [f"{returns.mean():.1f}", f"{normalized_score(env_id, returns.mean()):.1f}"]
                bar.write(f"step {step + 1}: loss {loss_avg:.4f}  return {returns.mean():.1f} "
                          f"(normalized {row[5]}) at target {target:g}")
                save_checkpoint(args.out, model, optimizer, cfg, data, env_id, args, step + 1)
                eval_time += time.time() - t_eval
            log.writerow(row)
            log_file.flush()
            bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}")
    log_file.close()
    save_checkpoint(args.out, model, optimizer, cfg, data, env_id, args, total_steps)
    elapsed = time.time() - t0 - eval_time
    print(f"done: {total_steps} steps in {elapsed:.0f}s ({total_steps / elapsed:.1f} steps/s), "
          f"final loss {loss_avg:.4f}, checkpoint {args.out}, log {log_path}")


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError, download.DownloadError) as e:
        sys.exit(f"error: {e}")
