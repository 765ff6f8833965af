"""
Train a Decision Transformer on D4RL-style trajectories (or --model reinformer, tt, bc, iql: the
others it is measured against, from methods/).

    python train.py --epochs 120                  # halfcheetah-expert-v2, downloaded when missing
    python train.py --data my.hdf5 --max-steps 2000
    python train.py --data maze2d-umaze-sparse.hdf5  # a maze: the file names its evaluation
    python train.py --resume ckpt.pt              # continue an interrupted run exactly
    python train.py --graph-steps 50              # one GPU: 50 whole steps per CUDA graph replay
    torchrun --nproc_per_node 2 train.py ...      # data-parallel over 2 processes (GPUs or CPU)

One epoch is one pass over the dataset's timesteps: ceil(N / (batch_size * context_len)) steps
(IQL draws single transitions: ceil(N / batch_size)).
Writes ckpt.pt (model, optimizer, RNG state, config, dataset statistics, step) every --save-every
steps and at the end, and a CSV log beside it (python -m study.plot ckpt.csv draws it). Ctrl-C saves a
checkpoint and exits.
"""
import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

import download
from common import distributed, train_flags
from common.checkpoint import (FORMAT_VERSION, RunError, StopOnSignal, build_model, check_same_data, claim_output,
                               release_output, restore, resume_run, rng_state, save_checkpoint)
from common.datafiles import DataError
from common.device import bf16_pays, compile_mode, compiles, evaluates_in_bf16, resolve_device
from common.graphsteps import GraphedSteps
from common.rollout import rollout
from common.runlog import Progress, data_line, end_line, mean_finite_loss, open_log
from common.tasks import locomotion_task
from data import load_trajectories, sample_batch
from methods import iql, qdt, reinformer, tt
from model import DTConfig, action_loss, configure_optimizer, get_lr

DEFAULT_DATA = "data/halfcheetah-expert-v2.hdf5"


class ActionLoss(torch.nn.Module):
    """The DT's and BC's training forward: windows in, action_loss out, the matmuls under `amp` (bf16
    where it pays), the loss in fp32. torch.compile and DDP wrap it; it holds the model, not a copy."""

    def __init__(self, model, amp):
        super().__init__()
        self.model, self.amp = model, amp

    def forward(self, states, actions, returns_to_go, timesteps, mask):
        with self.amp:
            pred = self.model(states, actions, returns_to_go, timesteps, mask)
        return action_loss(pred.float(), actions, mask)


@dataclass(frozen=True)
class Recipe:
    """What one model brings to the training loop, which itself names no model: its paper's
    settings, how a batch is drawn, its loss, its optimizer and its learning-rate schedule, each
    from the run's settings to the plain values its file's functions take."""
    defaults: dict       # for the flags left unset
    settings: tuple      # the flags it reads beside train_flags.COMMON; the config line shows these
    rows_per_sample: Callable  # (args) -> dataset rows one sample covers, which sizes an epoch
    sample: Callable     # (data, args, generator) -> batch, a tuple of device tensors
    objective: Callable  # (model, args, amp) -> module whose forward(*batch) is the loss
    optimizer: Callable  # (model, args) -> torch optimizer
    lr: Callable         # (step, total_steps, max_lr) -> learning rate
    bf16: bool = True    # may train under bf16 autocast
    after_step: Callable = None  # (model, args), after each optimizer step
    check: Callable = None       # (args) -> what is wrong with its settings, or None
    prepare: Callable = None     # (data, args): what it makes of the data once (IQL: transitions)
    config: Callable = None      # (args, data) -> its model's config; default model_config
    describe: Callable = None    # (data) -> how it sees the rewards, for the data: line


# The DT and BC: the DT paper's settings, batches of K-step windows, the actions' squared error.
WINDOWS = dict(
    defaults=dict(batch_size=64, lr=1e-3, n_layer=DTConfig.n_layer, n_head=DTConfig.n_head, n_embd=DTConfig.n_embd,
                  dropout=DTConfig.dropout, weight_decay=1e-4, grad_clip=0.25),
    rows_per_sample=lambda args: args.context_len,
    sample=lambda data, args, gen: sample_batch(data, args.batch_size, args.context_len, gen),
    objective=lambda model, args, amp: ActionLoss(model, amp),
    optimizer=lambda model, args: configure_optimizer(model, args.lr, args.weight_decay),
    lr=get_lr,
)
DT_SETTINGS = ("context_len", "n_layer", "n_head", "n_embd", "dropout", "weight_decay", "grad_clip", "gamma")


def iql_config(args):
    return iql.IQLConfig(args.expectile, args.temperature, args.discount, args.tau)


MODELS = {
    "dt": Recipe(settings=(*DT_SETTINGS, "relabel_returns"), **WINDOWS),
    # BC predicts each step of a window from its state alone: the same batches, loss and schedule.
    "bc": Recipe(settings=("context_len", "n_layer", "n_embd", "dropout", "weight_decay", "grad_clip"),
                 **WINDOWS),
    # The max-return DT (reinformer.py): the DT's windows and settings, the paper's expectile and
    # loss weight, its loss.
    "reinformer": Recipe(**{**WINDOWS, "defaults": {**WINDOWS["defaults"], "expectile": reinformer.EXPECTILE,
                                                    "return_weight": reinformer.RETURN_WEIGHT},
                            "objective": lambda model, args, amp: reinformer.Objective(
                                model, amp, args.expectile, args.return_weight)},
                         settings=(*DT_SETTINGS, "expectile", "return_weight"),
                         check=lambda args: reinformer.check(args.expectile, args.return_weight)),
    # IQL (iql.py): the IQL paper's MuJoCo settings (batch 256, Adam at 3e-4, 2 x 256 MLPs, no
    # weight decay or gradient clipping), single transitions, iql_loss.
    "iql": Recipe(defaults=dict(batch_size=256, lr=3e-4, n_layer=2, n_head=1, n_embd=256, dropout=0.0,
                                weight_decay=0.0, grad_clip=None, **asdict(iql.IQLConfig())),
                  settings=("n_layer", "n_embd", *iql.IQLConfig.__dataclass_fields__),
                  rows_per_sample=lambda args: 1,
                  sample=lambda data, args, gen: iql.sample_transitions(data, args.batch_size, gen),
                  objective=lambda model, args, amp: iql.Objective(model, iql_config(args)),
                  optimizer=lambda model, args: iql.configure_optimizer(model, args.lr),
                  lr=iql.actor_lr,
                  # Its Bellman targets and log-probabilities are sums and differences of large
                  # numbers, where bf16's 8 bits of mantissa would be noise.
                  bf16=False,
                  after_step=lambda model, args: model.update_targets(args.tau),
                  check=lambda args: iql_config(args).problem(),
                  prepare=lambda data, args: iql.prepare(data, args.reward_mode),
                  describe=lambda data: f"rewards x {data.transitions.reward_scale:.4g}"),
    # The Trajectory Transformer (tt.py): the paper's settings (4 layers, 4 heads, 128 wide, AdamW
    # at 6e-4 with weight decay 0.1 and betas (0.9, 0.95), gradient clipping 1, batch 256), windows
    # of 10 transitions as tokens, weighted_token_loss.
    "tt": Recipe(defaults=dict(batch_size=256, lr=6e-4, n_layer=4, n_head=4, n_embd=128, dropout=0.1,
                               weight_decay=0.1, grad_clip=1.0),
                 settings=("n_layer", "n_head", "n_embd", "dropout", "weight_decay", "grad_clip"),
                 rows_per_sample=lambda args: tt.TTConfig.n_transitions,
                 sample=lambda data, args, gen: tt.sample_windows(data.tokens, data.tt_config, args.batch_size, gen),
                 objective=lambda model, args, amp: tt.Objective(model, amp),
                 optimizer=lambda model, args: configure_optimizer(model, args.lr, args.weight_decay,
                                                                   betas=(0.9, 0.95)),
                 lr=get_lr,
                 prepare=lambda data, args: tt.prepare(data, args.n_layer, args.n_head, args.n_embd, args.dropout),
                 config=lambda args, data: data.tt_config,
                 describe=tt.describe),
}
def parse_args(argv=None):
    return train_flags.parse_args(argv, MODELS, __doc__, DEFAULT_DATA)


def model_config(args, data):
    return DTConfig(kind=args.model, state_dim=data.state_dim, act_dim=data.act_dim, context_len=args.context_len,
                    n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
                    max_ep_len=max(1000, int(data.timesteps.max()) + 1))


def use_bf16(args, device):
    """bf16 autocast unless --no-amp, or the model keeps to fp32 (IQL), or the device would only
    emulate bf16 (device.bf16_pays)."""
    return not args.no_amp and MODELS[args.model].bf16 and bf16_pays(device)


def setup_training(cfg, args, device):
    """The model, the objective the training forward goes through (compiled with --compile, the
    default on CUDA; wrapped in DDP under torchrun) and the optimizer: one place, so bench.py
    measures exactly what train.py runs."""
    recipe = MODELS[args.model]
    model = build_model(cfg).to(device)
    optimizer = recipe.optimizer(model, args)
    # bf16 for the matmuls, fp32 weights and optimizer state. No cache of bf16 weight copies: each
    # weight is cast once a forward anyway, and a recorded CUDA graph must not keep them.
    amp = torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16,
                         enabled=use_bf16(args, device), cache_enabled=False)
    objective = recipe.objective(model, args, amp)
    if compiles(args.compile, device):
        objective = torch.compile(objective, mode=compile_mode(device, graphed=args.graph_steps > 0))
    return model, distributed.wrap(objective, device), optimizer


def set_lr(optimizer, lr, args):
    for group in optimizer.param_groups:  # a "constant" group (IQL's critics) keeps --lr
        group["lr"] = args.lr if group.get("schedule") == "constant" else lr


def train_step(model, objective, optimizer, batch, args):
    """One optimizer step on one batch; returns the loss as a device tensor (no host sync)."""
    loss = objective(*batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    after_step = MODELS[args.model].after_step
    if after_step:
        after_step(model, args)
    return loss.detach()


def training_steps(recipe, model, objective, optimizer, data, args, gen, total_steps, device):
    """(step, n) -> the losses of training steps step .. step + n - 1, (n,) on the device: one
    step at a time as below, or with --graph-steps K the same steps recorded as a CUDA graph
    (graphsteps.py)."""
    if args.graph_steps:
        return GraphedSteps(args.graph_steps, lambda batch: train_step(model, objective, optimizer, batch, args),
                            lambda: recipe.sample(data, args, gen), lambda s: recipe.lr(s, total_steps, args.lr),
                            total_steps, optimizer, gen, device).run

    def run(step, n):
        losses = []
        for s in range(step, step + n):
            set_lr(optimizer, recipe.lr(s, total_steps, args.lr), args)
            batch = recipe.sample(data, args, gen)
            losses.append(train_step(model, objective, optimizer, batch, args))
        return torch.stack(losses)
    return run


def steps_before_looking_up(done, total_steps, args):
    """How many steps the loop runs before it looks at signals, logs and saves again: one, or with
    --graph-steps up to K, never past a log, save or evaluation point or the end."""
    if not args.graph_steps:
        return 1
    every = [e for e in (args.log_every, args.save_every, args.eval_every) if e]
    return min(args.graph_steps, total_steps - done, *((done // e + 1) * e - done for e in every))


def main(argv=None):
    args, saved = parse_args(argv), None
    if args.resume:
        saved, settings = resume_run(args.resume, args.data, defaults=vars(parse_args([])))
        args = argparse.Namespace(**settings)
    args.data = args.data or DEFAULT_DATA
    recipe = MODELS[args.model]
    rank, world, device = distributed.init(resolve_device(args.device))
    if args.graph_steps and world > 1:
        raise RunError("--graph-steps: one process only (CUDA graphs around DDP's gradient hooks are untested here)")
    master = rank == 0  # the one process that prints, logs, evaluates and writes the checkpoint
    say = print if master else (lambda *_: None)
    # Settle the output before any work: a path that cannot be written is found now, not after
    # the first save, and a run still writing there is never clobbered.
    lock = claim_output(args.out, resuming=saved is not None, overwrite=args.overwrite) if master else None
    log_file = None
    try:
        say(f"config: {train_flags.run_settings(args, MODELS)}" + (f"; {world} processes" if world > 1 else ""))
        torch.manual_seed(args.seed)  # the same initial weights in every process
        with distributed.master_first(master):
            data, task = load_data(args)
        if saved:
            check_same_data(saved, data, task.env_id, args.resume, args.data)
        data.to(device)  # the whole dataset lives on the training device; batches never cross the bus
        if recipe.prepare:
            recipe.prepare(data, args)
        steps_per_epoch = math.ceil(data.num_steps / (args.batch_size * recipe.rows_per_sample(args) * world))
        total_steps = args.max_steps or max(1, round(args.epochs * steps_per_epoch))
        target = args.target if args.target is not None else task.default_target

        cfg = (recipe.config or model_config)(args, data)
        model, objective, optimizer = setup_training(cfg, args, device)
        gen = torch.Generator(device=device).manual_seed(args.seed + rank)  # each process its own batches
        start_step, elapsed_before = restore(saved, model, optimizer, gen, args.resume, args.seed, rank) if saved else (0, 0.0)
        run_info = {"format_version": FORMAT_VERSION, "model_config": asdict(cfg), "env_id": task.env_id,
                    "task": task.to_dict(),
                    **{k: v.cpu() if torch.is_tensor(v) else v for k, v in vars(data.norm).items()},
                    "train_args": vars(args), "total_steps": total_steps, "bf16": use_bf16(args, device)}
        describe = recipe.describe or (lambda d: f"returns-to-go / {d.norm.reward_scale:g}")
        say(data_line(args.data, data, task.env_id, device, use_bf16(args, device), describe(data), args.top_pct,
                      args.reward_mode, args.relabel_returns))
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
        progress = Progress(start_step, total_steps, enabled=master)
        run_steps = training_steps(recipe, model, objective, optimizer, data, args, gen, total_steps, device)
        done = start_step
        with StopOnSignal() as signals:
            while done < total_steps:
                # sample -> step, n steps at a time: one, or with --graph-steps up to K replayed as
                # one CUDA graph. The losses stay on the device: no host sync until a log point.
                n = steps_before_looking_up(done, total_steps, args)
                recent[n_recent:n_recent + n] = run_steps(done, n)
                n_recent, done = n_recent + n, done + n
                progress.update(n)

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
                lr = recipe.lr(done - 1, total_steps, args.lr)
                loss_avg = mean_finite_loss(recent[:n_recent].tolist(), done - n_recent + 1, args.out, saved_step)
                n_recent = 0
                if master:
                    row = [done, f"{loss_avg:.5f}", f"{lr:.3g}", "", "", ""]
                    if evaluating:
                        t_eval = time.time()
                        returns, _, policy = rollout(model, data.norm, task, target, args.eval_episodes,
                                                     progress=False, bf16=evaluates_in_bf16(run_info["bf16"], device))
                        model.train()
                        row[4:] = [f"{returns.mean():.1f}", f"{task.normalized_score(returns.mean()):.1f}"]
                        progress.write(f"step {done}: loss {loss_avg:.4f}  return {returns.mean():.1f} "
                                       f"(normalized {row[5]}), {policy}")
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
                    progress.log(done, loss_avg, lr)
                # `finished`, not signals.requested: a Ctrl-C that arrives after the save decision
                # above must wait one more step to be saved, not end the run unsaved.
                if finished:
                    break
        progress.close()
        if master:
            print(end_line(args.out, world, done, total_steps, saved_step, (total_steps - start_step) / (
                elapsed - elapsed_before) if done == total_steps else 0.0, elapsed, loss_avg, log_path))
    finally:
        if log_file:
            log_file.close()
        if lock:
            release_output(lock)


# --- what the loop needs, below it: the data ------------------------------------------------------

def load_data(args):
    """(Trajectories, tasks.Task): the data, and where its policy is evaluated: --env, or what the
    file says (a maze's eval_env_spec, a D4RL file's name)."""
    path = download.locate(args.data)  # minari:ID, hf:CONFIG and missing D4RL files are fetched
    data, task = load_trajectories(path, gamma=args.gamma, reward_mode=args.reward_mode, top_pct=args.top_pct)
    if args.relabel_returns:
        qdt.relabel(data, args.relabel_returns, args.reward_mode)
    if args.env:
        task = locomotion_task(args.env)
    if task is None:
        raise DataError(f"{path}: cannot tell which environment this data is from; pass --env")
    return data, task


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
