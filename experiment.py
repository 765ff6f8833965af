"""
The comparison in the README: the DT against behaviour cloning, 10% BC and IQL on the three
medium-expert files, with dense and with delayed rewards, over several training seeds.

    python experiment.py --data-dir data              # run whatever is missing, one run at a time
    python experiment.py --list                       # the plan, and which runs are done
    python experiment.py --table                      # the README's table, from the results file
    python experiment.py --curves curves.png          # every finished run's learning curve

Each run trains with train.py into runs/NAME.pt (an interrupted run is resumed, not restarted),
then evaluate.py scores its last checkpoint on 10 episodes (reset seeds 0-9) into
results/runs/NAME.json, and its training log is kept as results/runs/NAME.csv. After every run,
results/medium-expert.csv is rebuilt with one row per finished run. Stop it at any time (Ctrl-C);
the same command carries on where it stopped.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import plot
from checkpoint import atomic_write

HERE = Path(__file__).parent
RESULTS = HERE / "results"
FILES = {"halfcheetah": "halfcheetah-medium-expert-600ep.hdf5", "hopper": "hopper-medium-expert.hdf5",
         "walker2d": "walker2d-medium-expert.hdf5"}
# Training budgets, with evaluation points for a learning curve; the DT is scored at the DT paper's
# targets. The DT, BC and 10% BC take 5-25 minutes of one CPU core. IQL gets the IQL paper's 1M steps
# (about two hours): at 200,000 steps, with its actor's learning rate decayed over those, its curve
# flattened far below where the 1M schedule takes it (README), so the shorter budget would not be
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
}
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
    budget_checks = [(f"halfcheetah-iql-200k-{mode}-s0", "halfcheetah", "iql-200k", mode, 0) for mode in ("dense", "delayed")]
    budget_checks.append(("hopper-dt-120ep-dense-s0", "hopper", "dt-120ep", "dense", 0))
    return budget_checks + runs


def run(name, body, method, mode, seed, data_dir):
    ckpt, out_json = HERE / "runs" / f"{name}.pt", RESULTS / "runs" / f"{name}.json"
    if out_json.exists():
        return
    ckpt.parent.mkdir(exist_ok=True)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    if ckpt.exists():
        train = ["--resume", str(ckpt), "--data", str(Path(data_dir) / FILES[body])]
    else:
        train = ["--data", str(Path(data_dir) / FILES[body]), *METHODS[method], "--reward-mode", mode,
                 "--seed", str(seed), "--out", str(ckpt)]
    print(f"== {name}: python train.py {' '.join(train)}", flush=True)
    subprocess.run([sys.executable, "train.py", *train], cwd=HERE, check=True)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    if saved["step"] < saved["total_steps"]:  # train.py was stopped (Ctrl-C, SIGTERM) and saved
        sys.exit(f"== {name}: stopped at step {saved['step']} of {saved['total_steps']}; "
                 f"the same command carries on from there")
    evaluation = subprocess.run([sys.executable, "evaluate.py", str(ckpt), "--episodes", "10", "--json"],
                                cwd=HERE, check=True, capture_output=True, text=True).stdout
    result = json.loads(evaluation)
    result.update(method=method, dataset=FILES[body], reward_mode=mode, seed=seed, steps=saved["step"],
                  train_s=round(saved["elapsed_s"], 1))
    (RESULTS / "runs" / f"{name}.csv").write_bytes(ckpt.with_suffix(".csv").read_bytes())
    out_json.write_text(json.dumps(result) + "\n")
    print(f"== {name}: normalized {result['normalized_score']:.1f} after {result['steps']} steps, "
          f"{result['train_s']:.0f} s", flush=True)


def gather():
    """Every finished run's JSON -> results/medium-expert.csv, in plan order."""
    rows = []
    for name, *_ in plan():
        path = RESULTS / "runs" / f"{name}.json"
        if path.exists():
            r = json.loads(path.read_text())
            rows.append([r[c] if not isinstance(r[c], float) else round(r[c], 4) for c in COLUMNS])
    with open(RESULTS / "medium-expert.csv", "w", newline="") as f:
        csv.writer(f).writerows([COLUMNS, *rows])
    return rows


def table():
    """Normalized score per method and dataset: mean ± std over seeds, then each seed's score."""
    with open(RESULTS / "medium-expert.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    planned = {(method, mode, body) for _, body, method, mode, _ in plan()}
    print("| method | rewards | " + " | ".join(FILES) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in FILES) + " |")
    for method in METHODS:
        for mode in ("dense", "delayed"):
            cells = []
            for body in FILES:
                scores = [float(r["normalized_score"]) for r in rows
                          if (r["method"], r["reward_mode"], r["dataset"]) == (method, mode, FILES[body])]
                if len(scores) > 1:
                    cells.append(f"{np.mean(scores):.1f} ± {np.std(scores):.1f} ({', '.join(f'{s:.1f}' for s in scores)})")
                elif scores:
                    cells.append(f"{scores[0]:.1f} (one seed)")
                else:
                    cells.append("not run yet" if (method, mode, body) in planned else "–")
            if any(c not in ("not run yet", "–") for c in cells):
                print(f"| {method} | {mode} | " + " | ".join(cells) + " |")


def curves(path):
    """Every finished run's learning curve, the normalized score of its evaluations during training
    against its training time, one panel per body: the evidence for the budgets in METHODS. The
    time axis is logarithmic: IQL's budget is ten times the others'."""
    plt = plot.pyplot()
    fig, axes = plt.subplots(1, len(FILES), figsize=(5 * len(FILES), 4), dpi=120, sharex=True, sharey=True)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    labelled = set()
    for name, body, method, mode, seed in plan():
        log_path = RESULTS / "runs" / f"{name}.csv"
        if not log_path.exists():
            continue
        log = plot.read_log(log_path)
        points = [(t, v) for t, v in zip(log["elapsed_s"], log["eval_score"]) if not np.isnan(v)]
        label = f"{method}, {mode} rewards"
        ax = axes[list(FILES).index(body)]
        ax.plot(*zip(*points), color=colors[method], linestyle="--" if mode == "delayed" else "-", marker=".",
                alpha=0.8, label=None if label in labelled else label)
        labelled.add(label)
    for ax, body in zip(axes, FILES):
        ax.set(xscale="log", title=FILES[body], xlabel="training time (s, one CPU core)")
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="normalized score (5 episodes)")
    fig.legend(loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    with atomic_write(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data", help="folder holding the three medium-expert files")
    p.add_argument("--list", action="store_true", help="print the plan and what is done; run nothing")
    p.add_argument("--table", action="store_true", help="rebuild results/medium-expert.csv from the runs' JSON "
                   "and print it as a Markdown table; run nothing")
    p.add_argument("--only", help="run only the plan entries whose name contains this text")
    p.add_argument("--curves", metavar="PNG", type=Path, help="draw every finished run's learning curve "
                   "into this PNG (needs matplotlib); run nothing")
    args = p.parse_args(argv)
    if args.list:
        for name, *_ in plan():
            print(f"{'done' if (RESULTS / 'runs' / f'{name}.json').exists() else '    '}  {name}")
        return
    if args.table:
        gather()
        table()
        return
    if args.curves:
        plot.require_matplotlib(p, "--curves")
        curves(args.curves)
        print(f"experiment: {args.curves}")
        return
    missing = [f for f in FILES.values() if not (Path(args.data_dir) / f).exists()]
    if missing:
        sys.exit(f"error: {args.data_dir} lacks {', '.join(missing)}; point --data-dir at the folder that holds them")
    print(f"experiment: {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for entry in plan():
        if args.only and args.only not in entry[0]:
            continue
        run(*entry, args.data_dir)
        gather()


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: a run failed ({' '.join(map(str, e.cmd[1:3]))} ...); fix it and run the same command again")
    except KeyboardInterrupt:
        sys.exit("interrupted; run the same command to carry on")
