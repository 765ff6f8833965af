"""
The comparison in the report (results/README.md): the DT against behaviour cloning, 10% BC, IQL,
the Trajectory Transformer, and the DT taught to stitch (Reinformer; QDT's relabelling with an
IQL run's V), over several training seeds, in two studies: the three
medium-expert files with dense and with delayed rewards ("medium-expert"), and the three
sparse-reward mazes that need stitching ("maze2d").

    python -m study.experiment --data-dir data              # run whatever is missing, one run at a time
    python -m study.experiment --list                       # the plan, and which runs are done
    python -m study.experiment --table                      # the report's tables, from the results files
    python -m study.experiment --curves curves.png          # every finished run's learning curve

Each run trains with train.py into runs/NAME.pt (an interrupted run is resumed, not restarted),
then evaluate.py scores its last checkpoint (a body on 10 episodes, reset seeds 0-9; a maze on 20,
whose returns vary more; the TT's plans, which take hours, 5 episodes at a time, each part kept)
into results/runs/NAME.json, and its training log is kept as results/runs/NAME.csv. After every
run, results/STUDY.csv is rebuilt with one row per finished run. Stop it at any time (Ctrl-C);
the same command carries on where it stopped. Two processes can share the plan, one core each:
--method iql in one, --method dt bc bc10 in the other.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

from common.checkpoint import atomic_write
from common.tasks import locomotion_task
from data import episode_ends, episode_totals
from study import plot, stats

ROOT = Path(__file__).resolve().parent.parent  # the repository: train.py, evaluate.py, runs/, results/
RESULTS = ROOT / "results"
STUDIES = {
    "medium-expert": {"halfcheetah": "halfcheetah-medium-expert-600ep.hdf5", "hopper": "hopper-medium-expert.hdf5",
                      "walker2d": "walker2d-medium-expert.hdf5"},
    "maze2d": {f"maze2d-{m}": f"maze2d-{m}-sparse.hdf5" for m in ("umaze", "medium", "large")},
}
FILES = {task: file for files in STUDIES.values() for task, file in files.items()}
# A maze's DT is scored at several targets (maze_targets): the data's best episode return, twice
# it, and the evaluation's reference maximum, which no data episode comes near. Its table shows
# the one chosen from seed 0's sweep; every seed's sweep is in its JSON.
MAZE_DT_TARGET = "reference maximum"
# Training budgets, with evaluation points for a learning curve; the DT is scored at the DT paper's
# targets. The DT, BC and 10% BC take 5-25 minutes of one CPU core. IQL gets the IQL paper's 1M steps
# (about two hours): at 200,000 steps, with its actor's learning rate decayed over those, its curve
# flattened far below where the 1M schedule takes it (results/README.md), so the shorter budget would not be
# fair to it. The DT's 20 epochs are a sixth of the DT paper's 120; where its curve was still rising
# at 20 (Hopper), one run with the paper's budget measures what the shorter one costs it. These
# budget checks are the first entries of the plan.
METHODS = {
    "dt": ["--epochs", "20", "--eval-every", "2000"],
    "bc": ["--model", "bc", "--max-steps", "50000", "--eval-every", "10000"],
    "bc10": ["--model", "bc", "--top-pct", "10", "--max-steps", "50000", "--eval-every", "10000"],
    "iql": ["--model", "iql", "--max-steps", "1000000", "--eval-every", "50000", "--log-every", "1000"],
    "iql-200k": ["--model", "iql", "--max-steps", "200000", "--eval-every", "20000", "--log-every", "1000"],
    "dt-120ep": ["--epochs", "120", "--eval-every", "4000"],
    # The max-return DT on the DT's budget and architecture, the paper's expectile and loss weight.
    "reinformer": ["--model", "reinformer", "--epochs", "20", "--eval-every", "2000"],
    # The QDT relabelling: the DT's run on returns-to-go relabelled with the V of an IQL run of the
    # same seed (run() adds --relabel-returns). That IQL trains 100,000 steps: on the U-maze IQL's
    # score is on its plateau from 50,000 steps on (its 1M-step curve, results/runs/), and the
    # relabelling reads only V, which does not follow the actor's schedule.
    "qdt": ["--epochs", "20", "--eval-every", "2000"],
    "iql-100k": ["--model", "iql", "--max-steps", "100000", "--eval-every", "20000", "--log-every", "1000"],
    # The Trajectory Transformer: batch 64 (the paper's 256 is four times the work of a CPU step),
    # no evaluation during training (planning costs seconds a step on a CPU). The first run's loss
    # (Hopper) fell by 1% over the last 2,000 of its 10,000 steps: what two CPU cores allow.
    "tt": ["--model", "tt", "--batch-size", "64", "--max-steps", "10000", "--log-every", "100"],
    # HalfCheetah's and Walker2d's TT in what one CPU core trains and plans in one sitting of under
    # three hours (1.7 h of training at 0.56 steps/s on an EPYC core), since a checkpoint lives only
    # as long as its machine: their 10,000 steps take 5 hours.
    "tt-3500": ["--model", "tt", "--batch-size", "64", "--max-steps", "3500", "--log-every", "100"],
}
# Planning on a CPU: the paper's horizon for HalfCheetah and Walker2d, a quarter of its beam; 5
# episodes planned together (as fast per env step as 10 on one core, bench.py) and kept as they finish.
# The sitting's budget plans one transition ahead: a fifth of the tokens, and on Hopper horizon 1
# scored as horizon 5 did (results/README.md).
EVALUATION = {"tt": ["--beam-width", "32", "--horizon", "5"], "tt-3500": ["--beam-width", "32", "--horizon", "1"]}
EPISODES_TOGETHER = dict.fromkeys(EVALUATION, 5)
COLUMNS = ["method", "dataset", "reward_mode", "seed", "steps", "train_s", "target", "episodes",
           "mean_return", "std_return", "normalized_score"]


def plan():
    """(name, body, method, reward mode, seed), seed 0 of everything first: a run stopped part-way
    still leaves every cell of the table filled once. Dense figures get 3 seeds, delayed ones 2;
    BC and 10% BC never see a reward-to-go, so they train to the same weights in both modes and
    run once. First, the checks of the budgets (see METHODS)."""
    runs = []
    for seed in (0, 1, 2):
        for body in ("halfcheetah", "hopper", "walker2d"):
            for method in ("iql", "dt", "bc", "bc10"):
                for mode in ("dense", "delayed"):
                    if (mode == "delayed" and (method.startswith("bc") or seed == 2)):
                        continue
                    runs.append((f"{body}-{method}-{mode}-s{seed}", body, method, mode, seed))
    budget_checks = [(f"halfcheetah-iql-200k-{mode}-s0", "halfcheetah", "iql-200k", mode, 0)
                     for mode in ("dense", "delayed")]
    budget_checks.append(("hopper-dt-120ep-dense-s0", "hopper", "dt-120ep", "dense", 0))
    # The mazes: their own sparse rewards only (delaying them changes little: most episodes earn
    # nothing at all), 3 seeds of every method.
    mazes = [(f"{maze}-{method}-s{seed}", maze, method, "dense", seed)
             for seed in (0, 1, 2) for maze in STUDIES["maze2d"] for method in ("dt", "bc", "bc10", "iql")]
    # The Trajectory Transformer on the bodies, both seeds of Hopper first: it has the fewest
    # tokens a transition (16 against 25). Then one maze, the smallest (8 tokens a transition): the
    # planner that has a value estimate is the sequence model that might stitch. Then HalfCheetah
    # and Walker2d in a CPU sitting's budget (tt-3500), and last in the full one, which takes a
    # CPU core most of a day (or a GPU: .ci/gpu-check tt).
    planners = [(f"hopper-tt-dense-s{seed}", "hopper", "tt", "dense", seed) for seed in (0, 1)]
    planners.append(("maze2d-umaze-tt-s0", "maze2d-umaze", "tt", "dense", 0))
    for method in ("tt-3500", "tt"):
        planners += [(f"{body}-{method}-dense-s{seed}", body, method, "dense", seed)
                     for seed in (0, 1) for body in ("walker2d", "halfcheetah")]
    # The sequence models taught to stitch: the max-return DT on the mazes first (seed 0 of each
    # maze, then seed 1, ...), then on the bodies, dense with 3 seeds and delayed with 2.
    stitchers = [(f"{maze}-reinformer-s{seed}", maze, "reinformer", "dense", seed)
                 for seed in (0, 1, 2) for maze in STUDIES["maze2d"]]
    stitchers += [(f"{body}-reinformer-{mode}-s{seed}", body, "reinformer", mode, seed) for seed in (0, 1, 2)
                  for body in STUDIES["medium-expert"] for mode in ("dense", "delayed")
                  if not (mode == "delayed" and seed == 2)]
    # QDT on the three mazes, each run after the IQL whose V it is relabelled with.
    for seed in (0, 1, 2):
        for maze in STUDIES["maze2d"]:
            stitchers += [(f"{maze}-iql-100k-s{seed}", maze, "iql-100k", "dense", seed),
                          (f"{maze}-qdt-s{seed}", maze, "qdt", "dense", seed)]
    return budget_checks + runs + mazes + planners + stitchers


def study_of(task):
    return next(name for name, files in STUDIES.items() if task in files)


def maze_targets(path):
    """{name: return} the DT is asked for on a maze: the data's best episode return, twice it, and
    the reference maximum (the noise-free planner's mean return in the evaluation)."""
    with h5py.File(path, "r") as f:
        ends = episode_ends(f["terminals"][()], f["timeouts"][()])
        best = float(episode_totals(f["rewards"][()], ends).max())
        return {"data's best": best, "twice the data's best": 2 * best,
                "reference maximum": float(f.attrs["ref_max_score"])}


def run(name, task, method, mode, seed, data_dir):
    ckpt, out_json = ROOT / "runs" / f"{name}.pt", RESULTS / "runs" / f"{name}.json"
    if out_json.exists():
        return
    ckpt.parent.mkdir(exist_ok=True)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir) / FILES[task]
    maze = study_of(task) == "maze2d"
    if ckpt.exists():
        train = ["--resume", str(ckpt), "--data", str(data)]
    else:
        train = ["--data", str(data), *METHODS[method], "--reward-mode", mode, "--seed", str(seed), "--out", str(ckpt)]
        if method == "qdt":
            train += ["--relabel-returns", str(ROOT / "runs" / f"{task}-iql-100k-s{seed}.pt")]
        if maze:  # 10 episodes a point of the learning curve, not 5: a maze's returns vary more
            train += ["--eval-episodes", "10"]
    print(f"== {name}: python train.py {' '.join(train)}", flush=True)
    subprocess.run([sys.executable, "train.py", *train], cwd=ROOT, check=True)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    if saved["step"] < saved["total_steps"]:  # train.py was stopped (Ctrl-C, SIGTERM) and saved
        sys.exit(f"== {name}: stopped at step {saved['step']} of {saved['total_steps']}; "
                 f"the same command carries on from there")
    episodes = 20 if maze else 10
    if method in EPISODES_TOGETHER:
        result = evaluate_in_parts(ckpt, episodes, EPISODES_TOGETHER[method], EVALUATION[method])
    else:
        targets = maze_targets(data) if maze and (method.startswith("dt") or method == "qdt") else {}
        sweep = evaluate(ckpt, ["--episodes", str(episodes), *(["--target", *map(str, targets.values())]
                                                                if targets else [])])
        result = sweep[list(targets).index(MAZE_DT_TARGET)] if targets else sweep[0]
        if targets:
            result["sweep"] = [dict(r, target_name=t) for r, t in zip(sweep, targets)]
    result.update(method=method, dataset=FILES[task], reward_mode=mode, seed=seed, steps=saved["step"],
                  train_s=round(saved["elapsed_s"], 1))
    (RESULTS / "runs" / f"{name}.csv").write_bytes(ckpt.with_suffix(".csv").read_bytes())
    out_json.write_text(json.dumps(result) + "\n")
    print(f"== {name}: normalized {result['normalized_score']:.1f} after {result['steps']} steps, "
          f"{result['train_s']:.0f} s", flush=True)


def evaluate(ckpt, flags):
    """evaluate.py on a checkpoint -> its JSON result for each target it was asked."""
    out = subprocess.run([sys.executable, "evaluate.py", str(ckpt), "--json", *flags],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def evaluate_in_parts(ckpt, episodes, together, flags):
    """A planner's evaluation, `together` episodes at a time (episode i still reset with seed i),
    each part's result kept beside the checkpoint as it finishes: planning 10 episodes takes an
    hour or two of a CPU core, and a stopped run starts again at its first unfinished part. The
    parts are then one result, timed as evaluate.py times one call: seconds a step for
    `together` episodes, and those episodes over it in env steps/s."""
    parts = []
    for first in range(0, episodes, together):
        path = ckpt.with_suffix(f".episodes{first}.json")
        if not path.exists():
            [part] = evaluate(ckpt, ["--seed", str(first), "--episodes", str(together), *flags])
            with atomic_write(path) as tmp:
                Path(tmp).write_text(json.dumps(part) + "\n")
        parts.append(json.loads(path.read_text()))
    returns = np.array([r for part in parts for r in part["returns"]])
    seconds_per_step = float(np.mean([part["seconds_per_step"] for part in parts]))
    result = dict(parts[0], episodes=len(returns), returns=returns.tolist(), mean_return=float(returns.mean()),
                  std_return=float(returns.std()), episodes_together=together, seconds_per_step=seconds_per_step,
                  env_steps_per_s=together / seconds_per_step)
    result["normalized_score"] = float(np.mean(episode_scores(result)))
    return result


def gather():
    """Every finished run's JSON -> results/STUDY.csv, one file per study, in plan order. Written
    whole and renamed: two experiment processes may gather at the same time."""
    rows = {study: [] for study in STUDIES}
    for name, task, *_ in plan():
        path = RESULTS / "runs" / f"{name}.json"
        if path.exists():
            r = json.loads(path.read_text())
            rows[study_of(task)].append([r[c] if not isinstance(r[c], float) else round(r[c], 4) for c in COLUMNS])
    for study, study_rows in rows.items():
        if study_rows:
            with atomic_write(RESULTS / f"{study}.csv") as tmp, open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([COLUMNS, *study_rows])


# D4RL's own maze2d reference returns (its noisy-controller minimum and planner maximum), far below
# the ones our maze files carry (the noise-free planner in PointMaze v3: 229.7, 473.8, 624.2), so
# that our scores compare with published ones on this second scale.
D4RL_MAZE_REFERENCES = {"maze2d-umaze": (23.85, 161.86), "maze2d-medium": (13.13, 277.39),
                        "maze2d-large": (6.7, 273.99)}


def episode_scores(result, refs=None):
    """A run's evaluation JSON -> the normalized score of each of its episodes, on its own
    reference returns or on `refs`, a (low, high) pair."""
    low, high = refs or result.get("ref_returns") or locomotion_task(result["env"]).ref_returns
    return [100.0 * (r - low) / (high - low) for r in result["returns"]]


def table(study, references=None):
    """Normalized score per method and task: the mean over seeds and episodes with its 95%
    bootstrap interval (stats.bootstrap_mean), each seed's score, and each method's IQM over the
    study's tasks with its interval (stats.bootstrap_iqm). `references`, {task: (low, high)},
    scores on other reference returns than the runs' own (D4RL_MAZE_REFERENCES)."""
    files = STUDIES[study]
    results = {}
    for name, task, method, mode, seed in plan():
        path = RESULTS / "runs" / f"{name}.json"
        if task in files and path.exists():
            results.setdefault((method, mode, task), []).append(json.loads(path.read_text()))
    planned = {(method, mode, task) for _, task, method, mode, _ in plan()}
    scale = " on D4RL's reference returns" if references else ""
    print(f"\n{study}: normalized score{scale}, mean [95% bootstrap interval] (each seed)")
    print("| method | rewards | " + " | ".join(files) + " | IQM over tasks |")
    print("| --- | --- | " + " | ".join("---:" for _ in files) + " | ---: |")
    for method in METHODS:
        for mode in ("dense", "delayed"):
            cells, runs_by_task = [], {}
            for task in files:
                runs = results.get((method, mode, task), [])
                if runs:
                    refs = references and references[task]
                    scores = [episode_scores(r, refs) for r in runs]
                    mean, low, high = stats.bootstrap_mean(scores)
                    seeds = ", ".join(f"{np.mean(s):.1f}" for s in scores)
                    cells.append(f"{mean:.1f} [{low:.1f}, {high:.1f}] ({seeds})")
                    runs_by_task[task] = [float(np.mean(s)) for s in scores]
                else:
                    cells.append("not run yet" if (method, mode, task) in planned else "–")
            if not runs_by_task:
                continue
            whole = len(runs_by_task) == len(files) and all(len(v) > 1 for v in runs_by_task.values())
            summary = "{:.1f} [{:.1f}, {:.1f}]".format(*stats.bootstrap_iqm(runs_by_task)) if whole else "–"
            print(f"| {method} | {mode} | " + " | ".join(cells) + f" | {summary} |")


def sweeps(study):
    """The DT's target sweeps (a maze's): each run's normalized score at every target it was asked."""
    rows = []
    for name, task, method, mode, seed in plan():
        path = RESULTS / "runs" / f"{name}.json"
        if task in STUDIES[study] and path.exists() and "sweep" in (result := json.loads(path.read_text())):
            cells = [f"{r['target']:g}: {r['normalized_score']:.1f}" for r in result["sweep"]]
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
    if rows:
        print(f"\n{study}: the DT's normalized score at each target (the data's best episode return, twice it, "
              f"the reference maximum)")
        print("| run | data's best | twice the data's best | reference maximum |\n| --- | ---: | ---: | ---: |")
        print("\n".join(rows))


def curves(path, study):
    """Every finished run's learning curve, the normalized score of its evaluations during training
    against its training time, one panel per task: the evidence for the budgets in METHODS. The
    time axis is logarithmic: IQL's budget is ten times the others'."""
    plt = plot.pyplot()
    files = STUDIES[study]
    fig, axes = plt.subplots(1, len(files), figsize=(5 * len(files), 4), dpi=120, sharex=True, sharey=True)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    labelled = set()
    for name, body, method, mode, seed in plan():
        log_path = RESULTS / "runs" / f"{name}.csv"
        if body not in files or not log_path.exists():
            continue
        log = plot.read_log(log_path)
        points = [(t, v) for t, v in zip(log["elapsed_s"], log["eval_score"]) if not np.isnan(v)]
        label = f"{method}, {mode} rewards"
        ax = axes[list(files).index(body)]
        ax.plot(*zip(*points), color=colors[method], linestyle="--" if mode == "delayed" else "-", marker=".",
                alpha=0.8, label=None if label in labelled else label)
        labelled.add(label)
    for ax, body in zip(axes, files):
        ax.set(xscale="log", title=files[body], xlabel="training time (s, one CPU core)")
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="normalized score (5 episodes)")
    fig.legend(loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    with atomic_write(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data", help="folder holding the data files of the studies")
    p.add_argument("--study", choices=list(STUDIES), help="only this study's runs, table or curves (default: all; "
                   "--curves: medium-expert)")
    p.add_argument("--method", nargs="+", choices=list(METHODS), help="run only these methods' entries")
    p.add_argument("--list", action="store_true", help="print the plan and what is done; run nothing")
    p.add_argument("--table", action="store_true", help="rebuild results/STUDY.csv from the runs' JSON "
                   "and print each study as a Markdown table; run nothing")
    p.add_argument("--only", help="run only the plan entries whose name contains this text")
    p.add_argument("--curves", metavar="PNG", type=Path, help="draw every finished run's learning curve "
                   "into this PNG (needs matplotlib); run nothing")
    args = p.parse_args(argv)
    studies = [args.study] if args.study else list(STUDIES)
    entries = [e for e in plan() if study_of(e[1]) in studies and (not args.only or args.only in e[0])
               and (not args.method or e[2] in args.method)]
    if args.list:
        for name, *_ in entries:
            print(f"{'done' if (RESULTS / 'runs' / f'{name}.json').exists() else '    '}  {name}")
        return
    if args.table:
        gather()
        for study in studies:
            table(study)
            if study == "maze2d":
                table(study, D4RL_MAZE_REFERENCES)
            sweeps(study)
        return
    if args.curves:
        plot.require_matplotlib(p, "--curves")
        curves(args.curves, args.study or "medium-expert")
        print(f"experiment: {args.curves}")
        return
    missing = sorted({FILES[task] for _, task, *_ in entries if not (Path(args.data_dir) / FILES[task]).exists()})
    if missing:
        sys.exit(f"error: {args.data_dir} lacks {', '.join(missing)}; point --data-dir at the folder that holds them")
    print(f"experiment: {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for entry in entries:
        run(*entry, args.data_dir)
        gather()


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: a run failed ({' '.join(map(str, e.cmd[1:3]))} ...); fix it and run the same command again")
    except KeyboardInterrupt:
        sys.exit("interrupted; run the same command to carry on")
