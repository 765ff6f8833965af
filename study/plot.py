"""
Pictures of a run: the training log that train.py writes beside its checkpoint, and the
achieved-against-requested return of an evaluate.py --target sweep. Needs matplotlib (optional).

    python -m study.plot ckpt.csv                   # loss, learning rate and evaluation score -> ckpt.png
    python -m study.plot --values iql.pt --data FILE # IQL's V(s_t) along the data's episodes -> values.png
"""
import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import RunError, atomic_write, load_checkpoint
from common.datafiles import DataError, read_file
from data import episode_bounds, episode_ends, episode_totals
from methods import iql

LOG_COLUMNS = ("step", "loss", "lr", "elapsed_s", "eval_score")  # the columns of train.py's log read here


def require_matplotlib(parser, flag):
    try:
        import matplotlib  # noqa: F401  (checked when the arguments are, not after minutes of work)
    except ImportError:
        parser.error(f"{flag} needs matplotlib, which is optional: pip install matplotlib")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def read_log(path):
    """A training log's rows as {column: list of floats}; blank cells (no evaluation) are NaN."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise RunError(f"{path}: {e.strerror.lower()}") from None
    except (UnicodeDecodeError, csv.Error):
        rows = None
    if not rows or any(c not in rows[0] for c in LOG_COLUMNS):
        raise RunError(f"{path}: not a training log written by train.py (columns {', '.join(LOG_COLUMNS)})")
    try:
        return {c: [float(r[c]) if r[c] else math.nan for r in rows] for c in LOG_COLUMNS}
    except (TypeError, ValueError):
        raise RunError(f"{path}: damaged training log (a cell that is not a number)") from None


def plot_log(path):
    """Draw the log at `path` as a PNG beside it; returns the PNG's path."""
    log = read_log(path)
    plt = pyplot()
    from matplotlib.ticker import EngFormatter
    evals = [(s, v) for s, v in zip(log["step"], log["eval_score"]) if not math.isnan(v)]
    panels = 3 if evals else 2
    fig, axes = plt.subplots(panels, 1, sharex=True, figsize=(6, 2 * panels + 0.6), dpi=120)
    axes[0].plot(log["step"], log["loss"])
    # The DT's loss falls by an order of magnitude in the first few hundred steps; a log scale keeps
    # the slow part of training, where the policy gets good, readable. IQL's sum of losses holds a
    # log-likelihood and goes below zero, where only a linear scale can show it.
    positive = min(log["loss"]) > 0
    axes[0].set(yscale="log" if positive else "linear", ylabel="training loss", title=f"{path.name}: training")
    axes[1].plot(log["step"], log["lr"])
    axes[1].set(ylabel="learning rate")
    if evals:
        axes[2].plot(*zip(*evals), marker="o")
        axes[2].set(ylabel="normalized score")
    axes[-1].set(xlabel="step")
    axes[-1].xaxis.set_major_formatter(EngFormatter())  # 50 k, not 50000 running into 100000
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = path.with_suffix(".png")
    with atomic_write(out) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return out


def plot_sweep(results, path, title):
    """Achieved against requested return, one evaluate.py result per target."""
    plt = pyplot()
    targets = [r["target"] for r in results]
    fig, ax = plt.subplots(figsize=(5, 4.8), dpi=120)
    ax.plot(targets, targets, "--", color="grey", label="achieved = requested")
    # Each episode as a dot too: on mixed data a policy often picks one of the behaviours it has
    # seen, and a mean between two clusters describes no episode at all.
    for r in results:
        ax.scatter([r["target"]] * len(r["returns"]), r["returns"], s=10, color="black", alpha=0.3,
                   linewidths=0, label="one episode" if r is results[0] else None)
    n = results[0]["episodes"]
    ax.errorbar(targets, [r["mean_return"] for r in results], yerr=[r["std_return"] for r in results],
                marker="o", capsize=3, label=f"achieved (mean ± std, {n} episode{'s' if n > 1 else ''})")
    ax.set(xlabel="requested return (target)", ylabel="achieved return", title=title)
    # Below the axes: inside them, any corner can hide points (low targets often achieve far more).
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), fontsize=8, ncol=2, frameon=False)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def critique(ckpt_path, data_path):
    """What an IQL checkpoint's critics make of a data file, episode by episode: V(s_t) along each
    episode, the actor's weight exp(beta (Q - V)) on each of its steps (iql.actor_weights), and
    the episodes' true returns: (list of (T_i,) arrays, list of (T_i,) arrays, (N,) array). States
    are normalized with the checkpoint's own statistics."""
    model, norm, saved = load_checkpoint(ckpt_path)
    if model.cfg.kind != "iql":
        raise RunError(f"{ckpt_path}: a {model.cfg.kind} checkpoint has no value function; --values needs IQL's")
    arrays, _ = read_file(data_path)
    ends = episode_ends(arrays["terminals"], arrays["timeouts"])
    states = norm.states(torch.from_numpy(arrays["observations"].astype(np.float32)))
    actions = torch.from_numpy(arrays["actions"].astype(np.float32))
    with torch.no_grad():
        v = model.value(states)
        weights = iql.actor_weights(model.advantage(states, actions, v), saved["train_args"]["temperature"])
    first, last = episode_bounds(ends)

    def by_episode(x):
        return [x.numpy()[a:b + 1] for a, b in zip(first, last)]
    return by_episode(v), by_episode(weights), episode_totals(arrays["rewards"], ends)


def ranking(values, returns):
    """How often V ranks the better of two episodes higher, averaged over each episode's states:
    the fraction of all pairs of episodes (1: always, 0.5: a coin; NaN if no two returns differ)."""
    mean_v = np.array([v.mean() for v in values])
    better = returns[:, None] > returns[None, :]
    return float(((mean_v[:, None] > mean_v[None, :]) & better).sum() / better.sum()) if better.any() else math.nan


def summary(name, values, weights, returns):
    """The numbers behind the V(s_t) figure: does V rank the episodes, and whose actions does the
    actor clone? The halves are the episodes above and below the median return."""
    order = np.argsort(returns, kind="stable")
    half = len(order) // 2
    mean_v = np.array([v.mean() for v in values])
    lines = [f"{name}: V ranks {ranking(values, returns):.1%} of episode pairs right; mean V of the best "
             f"episode {mean_v[order[-1]]:.1f}, the median {mean_v[order[half]]:.1f}, the worst {mean_v[order[0]]:.1f}"]
    for label, idx in (("better", order[half:]), ("worse", order[:half])):
        w = np.concatenate([weights[i] for i in idx])
        lines.append(f"  {label} half: V ranks {ranking([values[i] for i in idx], returns[idx]):.1%} of its pairs "
                     f"right, mean V {mean_v[idx].mean():.1f}; actor's weight on its steps: mean {w.mean():.2f}, "
                     f"{np.mean(w >= iql.WEIGHT_CAP):.1%} at the cap of {iql.WEIGHT_CAP:.0f}")
    return "\n".join(lines)


def plot_values(checkpoints, data_path, path):
    """V(s_t) along the data's best, median and worst episode, one panel per checkpoint."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(checkpoints), figsize=(5 * len(checkpoints), 3.6), dpi=120, squeeze=False)
    for ax, ckpt in zip(axes[0], checkpoints):
        values, weights, returns = critique(ckpt, data_path)
        print(summary(Path(ckpt).name, values, weights, returns))
        order = np.argsort(returns, kind="stable")  # as summary() orders them: the same median episode
        for i, label in ((order[-1], "best"), (order[len(order) // 2], "median"), (order[0], "worst")):
            ax.plot(values[i], label=f"{label} episode (return {returns[i]:,.0f})")
        ax.set(title=f"{Path(ckpt).name}\nV ranks {ranking(values, returns):.0%} of episode pairs right",
               xlabel="step t", ylabel="V(s_t)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", metavar="LOG.csv", type=Path, nargs="*", help="training logs written by train.py")
    p.add_argument("--values", metavar="CKPT", nargs="+", help="IQL checkpoints: draw V(s_t) along episodes of --data")
    p.add_argument("--data", type=Path, help="with --values: the data file the episodes come from")
    p.add_argument("--out", type=Path, default=Path("values.png"), help="with --values: the PNG to write")
    args = p.parse_args(argv)
    require_matplotlib(p, "plot.py")
    if args.values:
        if not args.data:
            p.error("--values needs --data, the file whose episodes to draw")
        plot_values(args.values, args.data, args.out)
        print(f"plot: {args.out}")
    elif not args.logs:
        p.error("give training logs to draw, or --values")
    for log in args.logs:
        print(f"plot: {plot_log(log)}")


if __name__ == "__main__":
    try:
        main()
    except (RunError, DataError) as e:
        sys.exit(f"error: {e}")
