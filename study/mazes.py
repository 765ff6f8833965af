"""
What happens in the sparse-reward mazes, drawn on the maze itself (walls as blocks, the goal as a
star inside its 0.45 success circle), and how much stitching each maze needs. Pictures need
matplotlib.

    python -m study.mazes stitching DATA...                    # how much of each maze the data links to its goal
    python -m study.mazes paths CKPT... --out paths.png        # each checkpoint's evaluation episodes, same starts
                                                               # (a TT's: --beam-width, --horizon as evaluate.py)
    python -m study.mazes values CKPT --data DATA --out v.png  # IQL's V at rest over the maze and where the data
                                                               # is paid; or Reinformer's R̂ and its episodes
    python -m study.mazes targets DT.pt --data DATA --out t.png  # the data's best return-to-go from each cell,
                                                               # and the DT's episodes asked for more than that
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from common.checkpoint import RunError, atomic_write, load_checkpoint
from common.datafiles import DataError, read_file
from common.device import evaluates_in_bf16
from common.rollout import rollout
from common.tasks import GOAL_RADIUS, TaskError, maze_goal, task_from_attributes, task_from_checkpoint
from data import episode_ends, returns_to_go
from methods.plan import PlanSettings, add_planning_flags, check_planning_flags
from study import plot


class Maze:
    """A maze_map and gymnasium-robotics' coordinates: the maze's centre at the origin, one unit a
    cell, x to the right along a row, y up."""

    def __init__(self, task):
        self.cells = np.array([[1 if c == 1 else 0 for c in row] for row in task.env_kwargs["maze_map"]])
        self.height, self.width = self.cells.shape
        self.goal = np.array(maze_goal(task.env_kwargs))

    def cell_of(self, xy):
        """(N, 2) positions -> (N,) row and (N,) column indices."""
        col = np.clip(np.floor(xy[:, 0] + self.width / 2), 0, self.width - 1).astype(int)
        row = np.clip(np.floor(self.height / 2 - xy[:, 1]), 0, self.height - 1).astype(int)
        return row, col

    def centre(self, row, col):
        return col + 0.5 - self.width / 2, self.height / 2 - row - 0.5

    def free(self):
        return [(r, c) for r in range(self.height) for c in range(self.width) if not self.cells[r, c]]

    def draw(self, ax):
        extent = (-self.width / 2, self.width / 2, -self.height / 2, self.height / 2)
        ax.imshow(self.cells, cmap="Greys", vmin=0, vmax=1.4, extent=extent, zorder=0)
        ax.add_patch(plot.pyplot().Circle(self.goal, GOAL_RADIUS, fill=False, color="crimson", lw=1.5, zorder=3))
        ax.plot(*self.goal, marker="*", color="crimson", markersize=14, zorder=4)
        ax.set(xticks=[], yticks=[], xlim=extent[:2], ylim=extent[2:])


def read_maze_data(path):
    """(positions (N, 2), rewards (N,), episode ends (N,), task) of a maze file."""
    arrays, attrs = read_file(path)
    try:
        task = task_from_attributes(attrs, path)
    except TaskError as e:
        raise DataError(str(e)) from None
    if task is None or not task.env_kwargs.get("maze_map"):
        raise DataError(f"{path}: not a maze file (no eval_env_spec with a maze_map)")
    return arrays["observations"][:, :2], arrays["rewards"], episode_ends(arrays["terminals"], arrays["timeouts"]), task


def best_return_to_go_by_cell(maze, xy, rtg):
    """(H, W): the most reward any data episode went on to collect from a state in each cell (NaN
    for walls), given the data's positions and returns-to-go. Zero means no episode that passed
    there ever reached the goal."""
    best = np.full(maze.cells.shape, np.nan)
    best[maze.cells == 0] = 0.0
    row, col = maze.cell_of(xy)
    np.fmax.at(best, (row, col), rtg)
    return best


def stitching(path):
    """How much stitching a maze needs: from how many free cells some data episode goes on to the
    goal; of the episodes that pass through a cell, how many go on to it (averaged over the free
    cells); and how much of what the evaluation pays (its reference maximum) the best data
    episode earns. A policy that copies one episode gets at most that share; the rest must come
    from staying at the goal, which no episode does for long."""
    xy, rewards, ends, task = read_maze_data(path)
    maze, rtg = Maze(task), returns_to_go(rewards, ends)
    best = best_return_to_go_by_cell(maze, xy, rtg)
    free = maze.cells == 0
    row, col = maze.cell_of(xy)
    episode = np.cumsum(np.r_[0, ends[:-1]])
    # Each episode's first step in each cell it visits: did the episode go on to the goal from there?
    _, first = np.unique(episode * maze.cells.size + row * maze.width + col, return_index=True)
    went_on = np.zeros(maze.cells.shape)
    visits = np.zeros(maze.cells.shape)
    np.add.at(visits, (row[first], col[first]), 1)
    np.add.at(went_on, (row[first], col[first]), rtg[first] > 0)
    return {"free_cells": int(free.sum()), "cells_linked_to_goal": float((best[free] > 0).mean()),
            "episodes_that_go_on": float(np.mean(went_on[free] / np.maximum(visits[free], 1))),
            "best_episode_return": float(rtg.max()), "share_of_reference": float(rtg.max() / task.ref_returns[1])}


def episode_paths(ckpt_path, episodes, target=None, planning=None):
    """Positions of `episodes` evaluation episodes (reset seeds 0..), (T + 1, E, 2), and their
    returns. A TT checkpoint plans with `planning` (a plan.PlanSettings; the paper's by default)."""
    model, norm, ckpt = load_checkpoint(ckpt_path)
    task = task_from_checkpoint(ckpt)
    seen = []
    planning = planning or PlanSettings()
    returns = rollout(model, norm, task, task.default_target if target is None else target, episodes,
                      progress=False, record=seen, planning=planning,
                      bf16=evaluates_in_bf16(ckpt.get("bf16", False), "cpu")).returns  # a planner ignores it
    label = model.cfg.kind.upper()
    if model.cfg.kind == "tt":
        label += f", beam {planning.beam_width}, horizon {planning.horizon}"
    if ckpt.get("step", 0) < ckpt.get("total_steps", 0):  # a run still training: say how far it is
        label += f", step {ckpt['step']:,} of {ckpt['total_steps']:,}"
    return np.stack(seen)[..., :2], returns, task, label


def draw_paths(ax, maze, paths, returns):
    colors = plot.pyplot().cm.viridis(np.clip(returns / max(returns.max(), 1.0), 0, 1))
    for e in range(paths.shape[1]):
        ax.plot(paths[:, e, 0], paths[:, e, 1], color=colors[e], lw=1, alpha=0.8, zorder=2)
        ax.plot(*paths[0, e], marker="o", color=colors[e], markersize=4, zorder=2)


def figure_paths(ckpts, out, episodes, planning=None):
    plt = plot.pyplot()
    fig, axes = plt.subplots(1, len(ckpts), figsize=(4 * len(ckpts), 4.2), dpi=110, squeeze=False)
    for ax, ckpt in zip(axes[0], ckpts):
        paths, returns, task, kind = episode_paths(ckpt, episodes, planning=planning)
        maze = Maze(task)
        maze.draw(ax)
        draw_paths(ax, maze, paths, returns)
        ax.set_title(f"{Path(ckpt).stem} ({kind}): {task.normalized_score(returns.mean()):.1f}", fontsize=9)
    fig.suptitle(f"{episodes} evaluation episodes each, the same starts (dots);\n"
                 f"colour: the episode's return (yellow: the panel's best)", fontsize=10)
    save(fig, out)


def value_at_rest(model, norm, states):
    """What a model expects to collect from each of (N, 4) raw maze states: IQL's V, or the
    max-return DT's predicted return R̂ with the state as an episode's first step, in the file's
    reward units (a sparse maze's IQL trains on them unscaled)."""
    with torch.no_grad():
        s = norm.states(states)
        if model.cfg.kind == "iql":
            return model.value(s)
        K, S, A = model.cfg.context_len, s.shape[1], model.cfg.act_dim
        out = []
        for chunk in s.split(2048):  # a window of K steps a state: chunks keep the activations small
            n = len(chunk)
            window = torch.zeros(n, K, S)
            window[:, -1] = chunk
            real = torch.zeros(n, K, dtype=torch.bool)
            real[:, -1] = True
            out.append(model.get_return(window, torch.zeros(n, K, A), torch.zeros(n, K, 1),
                                        torch.zeros(n, K, dtype=torch.long), real))
        return torch.cat(out) * norm.reward_scale


def figure_values(ckpt, data_path, out, episodes=20):
    """A value over the maze, at rest (velocity 0) on a grid of positions: IQL's V beside the
    data's rewarded positions (do the backups carry the goal's value along the corridors?), or the
    max-return DT's predicted return beside its evaluation episodes and the data's best
    return-to-go from each cell (does R̂ stitch past what one episode earned?)."""
    model, norm, saved = load_checkpoint(ckpt)
    if model.cfg.kind not in ("iql", "reinformer"):
        raise RunError(f"{ckpt}: a {model.cfg.kind.upper()} checkpoint predicts no value (values needs IQL "
                       f"or Reinformer)")
    maze = Maze(task_from_checkpoint(saved))
    xs = np.linspace(-maze.width / 2, maze.width / 2, 24 * maze.width)
    ys = np.linspace(maze.height / 2, -maze.height / 2, 24 * maze.height)
    gx, gy = np.meshgrid(xs, ys)
    states = torch.tensor(np.stack([gx.ravel(), gy.ravel(), 0 * gx.ravel(), 0 * gy.ravel()], 1), dtype=torch.float32)
    v = value_at_rest(model, norm, states).numpy().reshape(gx.shape)
    row, col = maze.cell_of(np.stack([gx.ravel(), gy.ravel()], 1))
    v = np.ma.masked_where(maze.cells[row, col].reshape(gx.shape) == 1, v)
    xy, rewards, ends, _ = read_maze_data(data_path)
    plt = plot.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4.4), dpi=110)
    for ax in (left, right):
        maze.draw(ax)
    image = left.imshow(v, extent=(xs[0], xs[-1], ys[-1], ys[0]), cmap="magma", zorder=1)
    if model.cfg.kind == "iql":
        fig.colorbar(image, ax=left, shrink=0.8, label="V(x, y, at rest)")
        left.set_title(f"IQL's V after {saved['step']:,} steps", fontsize=9)
        paid = xy[1:][rewards[:-1] > 0]  # where the step that was paid led
        pick = np.random.default_rng(0).permutation(len(paid))[:3000]
        right.scatter(paid[pick, 0], paid[pick, 1], s=2, color="crimson", alpha=0.3, zorder=2)
        right.set_title(f"where the data is paid ({len(paid):,} rewarded steps)", fontsize=9)
    else:
        fig.colorbar(image, ax=left, shrink=0.8, label="predicted return R̂(x, y, at rest), first step")
        left.set_title(f"Reinformer's R̂ after {saved['step']:,} steps", fontsize=9)
        best = best_return_to_go_by_cell(maze, xy, returns_to_go(rewards, ends))
        for r, c in maze.free():
            x, y = maze.centre(r, c)
            right.text(x, y - 0.3, f"{best[r, c]:.0f}", ha="center", va="center", fontsize=8, color="navy", zorder=5)
        paths, returns, task, _ = episode_paths(ckpt, episodes)
        draw_paths(right, maze, paths, returns)
        right.set_title(f"its {episodes} episodes: mean return {returns.mean():.1f}\n"
                        f"numbers: the data's best return-to-go from each cell", fontsize=9)
    save(fig, out)


def figure_targets(ckpt, data_path, out, episodes, target=None):
    """What the DT is asked against what it saw: in each cell, the most reward any data episode
    went on to collect from there; over it, its episodes asked for `target` (default: the
    reference maximum, more than any data episode earned)."""
    xy, rewards, ends, task = read_maze_data(data_path)
    maze = Maze(task)
    best = best_return_to_go_by_cell(maze, xy, returns_to_go(rewards, ends))
    paths, returns, task, kind = episode_paths(ckpt, episodes, target)
    asked = task.default_target if target is None else target
    plt = plot.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=110)
    maze.draw(ax)
    for r, c in maze.free():
        x, y = maze.centre(r, c)
        ax.text(x, y - 0.3, f"{best[r, c]:.0f}", ha="center", va="center", fontsize=8, color="navy", zorder=5)
    draw_paths(ax, maze, paths, returns)
    ax.set_title(f"{kind} asked for {asked:g}: mean return {returns.mean():.1f}\n"
                 f"numbers: the data's best return-to-go from each cell", fontsize=9)
    save(fig, out)


def save(fig, out):
    fig.tight_layout()
    with atomic_write(out) as tmp:
        fig.savefig(tmp)
    plot.pyplot().close(fig)
    print(f"mazes: {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stitching", help="how much of each maze the data links to its goal")
    s.add_argument("data", nargs="+")
    for name, help in (("paths", "evaluation episodes of each checkpoint"), ("values", "IQL's V or Reinformer's R̂ over the maze"),
                       ("targets", "the DT's target against the data's returns-to-go")):
        s = sub.add_parser(name, help=help)
        s.add_argument("checkpoints" if name == "paths" else "checkpoint", nargs="+" if name == "paths" else None)
        if name != "paths":
            s.add_argument("--data", required=True, help="the maze file the checkpoint was trained on")
        s.add_argument("--out", required=True, type=Path, help="PNG to write")
        s.add_argument("--episodes", type=int, default=20)
        if name == "targets":
            s.add_argument("--target", type=float, help="return to ask for (default: the reference maximum)")
        if name == "paths":
            add_planning_flags(s, "a TT checkpoint")
    args = p.parse_args(argv)
    if args.command == "paths":
        check_planning_flags(p, args.beam_width, args.horizon)
    if getattr(args, "episodes", 1) < 1:
        p.error(f"--episodes must be at least 1, not {args.episodes}")
    if args.command == "stitching":
        print("| maze | free cells | cells from which some episode reaches the goal | episodes through a cell "
              "that go on to the goal (mean over cells) | best episode's return | its share of the reference maximum |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for path in args.data:
            m = stitching(path)
            print(f"| {Path(path).name} | {m['free_cells']} | {100 * m['cells_linked_to_goal']:.0f}% | "
                  f"{100 * m['episodes_that_go_on']:.1f}% | {m['best_episode_return']:.0f} | "
                  f"{100 * m['share_of_reference']:.0f}% |")
        return
    plot.require_matplotlib(p, args.command)
    if not args.out.parent.is_dir():
        p.error(f"--out {args.out}: no such directory: {args.out.parent}")
    if args.command == "paths":
        figure_paths(args.checkpoints, args.out, args.episodes, PlanSettings.given(args.beam_width, args.horizon))
    elif args.command == "values":
        figure_values(args.checkpoint, args.data, args.out, args.episodes)
    else:
        figure_targets(args.checkpoint, args.data, args.out, args.episodes, args.target)


if __name__ == "__main__":
    try:
        main()
    except (DataError, RunError) as e:
        sys.exit(f"error: {e}")
