"""
train.py's command line: the flags, each model's defaults for the ones left unset (its entry in
train.py's MODELS), and the checks that every value makes sense before anything is loaded or
overwritten, each failure one line. Kept out of train.py so that it reads as settings, data, model,
loop, save; train.py calls parse_args and hands plain values down from what it returns.
"""
import argparse

from model import DTConfig

# The flags every model reads; the others belong to the models whose `settings` name them.
COMMON = ("data", "env", "model", "epochs", "max_steps", "batch_size", "lr", "reward_mode", "top_pct",
          "device", "no_amp", "compile", "graph_steps", "seed", "out", "overwrite", "log_every", "save_every",
          "eval_every", "eval_episodes", "target", "resume")


def parse_args(argv, models, description, default_data):
    """train.py's settings: its flags, each model's defaults for those left unset, every value checked."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help=f"HDF5 trajectories (default {default_data}; a missing D4RL file "
                                  f"data/NAME.hdf5 is downloaded)")
    p.add_argument("--env", help="gymnasium env id (default: from the data file)")
    p.add_argument("--model", default="dt", choices=list(models),
                   help="dt: Decision Transformer; reinformer: the max-return DT (predicts its own target); tt: "
                        "Trajectory Transformer (plans with beam search); the baselines bc: behaviour cloning "
                        "(state -> action), iql: Implicit Q-Learning")
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
    check_foreign_flags(p, args, argv, models)
    for name, value in models[args.model].defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_args(p, args, models)
    if args.resume:
        extra = flags_given(p, argv) - {"resume", "data"}
        if extra:
            p.error("--resume continues a run with the settings it was started with; only --data may "
                    f"come with it, not {', '.join('--' + k.replace('_', '-') for k in sorted(extra))}")
    if args.max_steps:
        args.epochs = None  # the config line shows the budget that counts
    return args


def run_settings(args, models):
    """The settings this model reads, in the order they were parsed: what the config line shows."""
    used = set(COMMON) | set(models[args.model].settings)
    return {k: v for k, v in vars(args).items() if k in used}


def flags_given(parser, argv):
    """The options written on the command line, as opposed to left at their defaults."""
    unset = object()
    # argparse fills in a default only where the namespace has no value yet.
    blank = argparse.Namespace(**{k: unset for k in vars(parser.parse_args([]))})
    return {k for k, v in vars(parser.parse_args(argv, blank)).items() if v is not unset}


def check_foreign_flags(p, args, argv, models):
    """A flag that only other models read (--expectile with the DT) is a mistake, not a no-op."""
    own, written = set(COMMON) | set(models[args.model].settings), flags_given(p, argv)
    for name in sorted(written - own):
        owners = [model for model, recipe in models.items() if name in recipe.settings]
        if owners:
            p.error(f"--{name.replace('_', '-')}: for --model {' or '.join(owners)} only")


def check_args(p, args, models):
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
    problem = models[args.model].check(args) if models[args.model].check else None
    if problem:
        p.error(problem)
    if args.n_embd % args.n_head:
        p.error(f"--n-embd ({args.n_embd}) must be a multiple of --n-head ({args.n_head})")
    if not 0 < args.top_pct <= 100:
        p.error("--top-pct must be above 0 and at most 100")
    if args.relabel_returns and args.gamma != 1:
        p.error("--relabel-returns: QDT relabels undiscounted returns-to-go; leave --gamma at 1")
