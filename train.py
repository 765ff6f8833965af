"""
Train a Decision Transformer on D4RL-style trajectories (or --model tt, bc, iql: the others it is
measured against).

    python train.py --epochs 120                  # halfcheetah-expert-v2, downloaded when missing
    python train.py --data my.hdf5 --max-steps 2000
    python train.py --data maze2d-umaze-sparse.hdf5  # a maze: the file names its evaluation
    python train.py --resume ckpt.pt              # continue an interrupted run exactly
    python train.py --graph-steps 50              # one GPU: 50 whole steps per CUDA graph replay
    torchrun --nproc_per_node 2 train.py ...      # data-parallel over 2 processes (GPUs or CPU)

One epoch is one pass over the dataset's timesteps: ceil(N / (batch_size * context_len)) steps
(IQL draws single transitions: ceil(N / batch_size)).
Writes ckpt.pt (model, optimizer, RNG state, config, dataset statistics, step) every --save-every
steps and at the end, and a CSV log beside it (python plot.py ckpt.csv draws it). Ctrl-C saves a
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

import distributed
import download
import iql
import qdt
import reinformer
import tt
from checkpoint import (FORMAT_VERSION, RunError, StopOnSignal, build_model, check_same_data, claim_output,
                        release_output, restore, resume_run, rng_state, save_checkpoint)
from data import load_trajectories, sample_batch
from datafiles import DataError
from device import bf16_pays, compile_mode, compiles, evaluates_in_bf16, resolve_device
from graphsteps import GraphedSteps
from model import DTConfig, action_loss, configure_optimizer, get_lr
from rollout import rollout
from runlog import Progress, mean_finite_loss, open_log
from tasks import locomotion_task

DEFAULT_DATA = "data/halfcheetah-expert-v2.hdf5"


class ActionLoss(torch.nn.Module):
    """The DT's and BC's training forward: a batch of windows in, action_loss out. The matmuls run
    under `amp` (bf16 where it pays), the loss in fp32. Being a module, it is what torch.compile and
    DistributedDataParallel wrap; it holds the model, not a copy."""

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
    settings: tuple      # the flags it reads beside COMMON's; the config line shows these
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
# The flags every model reads; the others belong to the models whose `settings` name them.
COMMON = ("data", "env", "model", "epochs", "max_steps", "batch_size", "lr", "reward_mode", "top_pct",
          "device", "no_amp", "compile", "graph_steps", "seed", "out", "overwrite", "log_every", "save_every",
          "eval_every", "eval_episodes", "target", "resume")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help=f"HDF5 trajectories (default {DEFAULT_DATA}; a missing D4RL file "
                                  f"data/NAME.hdf5 is downloaded)")
    p.add_argument("--env", help="gymnasium env id (default: from the data file)")
    p.add_argument("--model", default="dt", choices=list(MODELS),
                   help="dt: Decision Transformer; reinformer: the max-return DT (predicts its own target); tt: Trajectory Transformer (plans with beam search); the "
                        "baselines bc: behaviour cloning (state -> action), iql: Implicit Q-Learning")
    p.add_argument("--epochs", type=float, default=120)
    p.add_argument("--max-steps", type=int, help="train this many steps instead of --epochs")
    p.add_argument("--batch-size", type=int, help="default 64; 256 for iql and tt")
    p.add_argument("--lr", type=float, help="default 1e-3; 3e-4 for iql, 6e-4 for tt")
    p.add_argument("--weight-decay", type=float, help="default 1e-4; 0 for iql, 0.1 for tt")
    p.add_argument("--grad-clip", type=float, help="default 0.25; none for iql, 1 for tt")
    p.add_argument("--context-len", type=int, default=DTConfig.context_len)
    p.add_argument("--n-layer", type=int, help="default 3; 2 for iql, 4 for tt")
    p.add_argument("--n-head", type=int, help="default 1; 4 for tt")
    p.add_argument("--n-embd", type=int, help="default 128; 256 for iql")
    p.add_argument("--dropout", type=float, help="default 0.1; 0 for iql")
    p.add_argument("--expectile", type=float, help="iql: the expectile V is fitted to (default 0.7); reinformer: "
                                                   "the expectile its predicted return is fitted to (default 0.99)")
    p.add_argument("--return-weight", type=float, help="reinformer: weight of the return loss beside the action's "
                                                       "(default 1)")
    p.add_argument("--temperature", type=float, help="iql: beta in the actor's weights exp(beta (Q - V)) (default 3)")
    p.add_argument("--discount", type=float, help="iql: gamma of the Bellman backups (default 0.99)")
    p.add_argument("--tau", type=float, help="iql: Polyak rate of the target Q networks (default 0.005)")
    p.add_argument("--gamma", type=float, default=1.0, help="discount for returns-to-go (1: the DT paper)")
    p.add_argument("--relabel-returns", metavar="IQL_CKPT", help="dt: train on QDT's returns-to-go, relabelled "
                   "with the V of an IQL checkpoint trained on the same data and rewards")
    p.add_argument("--reward-mode", default="dense", choices=["dense", "delayed"],
                   help="delayed: each episode's rewards all arrive at its last step (the sparse-reward test)")
    p.add_argument("--top-pct", type=float, default=100.0, metavar="X",
                   help="train only on the episodes whose return is in the top X%% (10 with --model bc: 10%% BC)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-amp", action="store_true",
                   help="train in fp32 instead of bf16 autocast (CUDA, and CPUs with bf16 arithmetic)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the training forward (default: on CUDA, off on a CPU)")
    p.add_argument("--graph-steps", type=int, default=0, metavar="K",
                   help="on one GPU, record K whole training steps (batch, forward, backward, update) as one "
                        "CUDA graph and replay it (0: off; on a CPU the same steps run without a graph)")
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
    check_foreign_flags(p, args, argv)
    for name, value in MODELS[args.model].defaults.items():
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
        saved, args = resume_run(args, defaults=parse_args([]))
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
        say(f"config: {run_settings(args)}" + (f"; {world} processes" if world > 1 else ""))
        torch.manual_seed(args.seed)  # the same initial weights in every process
        with distributed.master_first(master):
            data, task = load_data(args)
        if saved:
            check_same_data(saved, data, task.env_id, args)
        data.to(device)  # the whole dataset lives on the training device; batches never cross the bus
        if recipe.prepare:
            recipe.prepare(data, args)
        steps_per_epoch = math.ceil(data.num_steps / (args.batch_size * recipe.rows_per_sample(args) * world))
        total_steps = args.max_steps or max(1, round(args.epochs * steps_per_epoch))
        target = args.target if args.target is not None else task.default_target

        cfg = (recipe.config or model_config)(args, data)
        model, objective, optimizer = setup_training(cfg, args, device)
        gen = torch.Generator(device=device).manual_seed(args.seed + rank)  # each process its own batches
        start_step, elapsed_before = restore(saved, model, optimizer, gen, args, rank) if saved else (0, 0.0)
        run_info = {"format_version": FORMAT_VERSION, "model_config": asdict(cfg), "env_id": task.env_id,
                    "task": task.to_dict(),
                    **{k: v.cpu() if torch.is_tensor(v) else v for k, v in vars(data.norm).items()},
                    "train_args": vars(args), "total_steps": total_steps, "bf16": use_bf16(args, device)}
        say(describe_data(args, data, task, device))
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
                        returns = rollout(model, data.norm, task, target, args.eval_episodes, progress=False,
                                          bf16=evaluates_in_bf16(run_info["bf16"], device))
                        model.train()
                        row[4:] = [f"{returns.mean():.1f}", f"{task.normalized_score(returns.mean()):.1f}"]
                        progress.write(f"step {done}: loss {loss_avg:.4f}  return {returns.mean():.1f} "
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
                    progress.log(done, loss_avg, lr)
                # `finished`, not signals.requested: a Ctrl-C that arrives after the save decision
                # above must wait one more step to be saved, not end the run unsaved.
                if finished:
                    break
        progress.close()
        if master:
            report_end(args, world, done, total_steps, saved_step, start_step, elapsed, elapsed_before,
                       loss_avg, log_path)
    finally:
        if log_file:
            log_file.close()
        if lock:
            release_output(lock)


# --- what the loop needs, below it: arguments, data, the end of a run ----------------------------

def run_settings(args):
    """The settings this model reads, in the order they were parsed: what the config line shows."""
    used = set(COMMON) | set(MODELS[args.model].settings)
    return {k: v for k, v in vars(args).items() if k in used}


def flags_given(parser, argv):
    """The options written on the command line, as opposed to left at their defaults."""
    unset = object()
    # argparse fills in a default only where the namespace has no value yet.
    blank = argparse.Namespace(**{k: unset for k in vars(parser.parse_args([]))})
    return {k for k, v in vars(parser.parse_args(argv, blank)).items() if v is not unset}


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


def describe_data(args, data, task, device):
    kept = f" (the best {args.top_pct:g}% of {data.episodes_in_file})" if args.top_pct < 100 else ""
    delayed = ", rewards delayed to each episode's end" if args.reward_mode == "delayed" else ""
    if data.relabelled_goal:
        x, y = data.relabelled_goal
        delayed += f", rewards relabelled against the evaluation goal ({x:g}, {y:g}) as D4RL's maze2d"
    if args.relabel_returns:
        delayed += f", returns-to-go relabelled with the V of {args.relabel_returns} (QDT)"
    describe = MODELS[args.model].describe
    scale = describe(data) if describe else f"returns-to-go / {data.norm.reward_scale:g}"
    precision = "bf16 autocast" if use_bf16(args, device) else "fp32"
    return (f"data: {args.data}: {data.num_steps} steps in {len(data.episode_returns)} episodes{kept}, "
            f"mean return {data.episode_returns.mean():.1f}{delayed}; {scale}; env {task.env_id}; "
            f"device {device}, {precision}")


def check_foreign_flags(p, args, argv):
    """A flag that only other models read (--expectile with the DT) is a mistake, not a no-op."""
    own, written = set(COMMON) | set(MODELS[args.model].settings), flags_given(p, argv)
    for name in sorted(written - own):
        owners = [model for model, recipe in MODELS.items() if name in recipe.settings]
        if owners:
            p.error(f"--{name.replace('_', '-')}: for --model {' or '.join(owners)} only")


def check_args(p, args):
    """Every number a run is given must make sense before anything is loaded or overwritten."""
    for flag, value, low in (("--max-steps", args.max_steps, 1), ("--batch-size", args.batch_size, 1),
                             ("--context-len", args.context_len, 1), ("--n-layer", args.n_layer, 1),
                             ("--n-head", args.n_head, 1), ("--n-embd", args.n_embd, 1),
                             ("--log-every", args.log_every, 1), ("--save-every", args.save_every, 1),
                             ("--eval-every", args.eval_every, 0),
                             ("--graph-steps", args.graph_steps, 0), ("--eval-episodes", args.eval_episodes, 1)):
        if value is not None and value < low:
            p.error(f"{flag} must be at least {low}, not {value}")
    if not args.epochs > 0:
        p.error(f"--epochs must be above 0, not {args.epochs:g}")
    if not args.lr > 0:
        p.error(f"--lr must be above 0, not {args.lr:g}")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout must be at least 0 and below 1, not {args.dropout:g}")
    problem = MODELS[args.model].check(args) if MODELS[args.model].check else None
    if problem:
        p.error(problem)
    if args.n_embd % args.n_head:
        p.error(f"--n-embd ({args.n_embd}) must be a multiple of --n-head ({args.n_head})")
    if not 0 < args.top_pct <= 100:
        p.error("--top-pct must be above 0 and at most 100")
    if args.relabel_returns and args.gamma != 1:
        p.error("--relabel-returns: QDT relabels undiscounted returns-to-go; leave --gamma at 1")


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
