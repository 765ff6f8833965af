"""
What a training run leaves behind as it goes: the CSV log beside its checkpoint (python -m study.plot
ckpt.csv draws it), the loss check at every log point, and its progress on the terminal: a bar on
a terminal, and one plain line per log interval when the output goes to a file (nohup python
train.py ... > train.log), where a bar's carriage returns would fill the file.
"""
import csv
import math
import sys
import time

from tqdm import tqdm

from common.checkpoint import RunError

LOG_COLUMNS = ["step", "loss", "lr", "elapsed_s", "eval_return", "eval_score"]


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


class Progress:
    """A tqdm bar on a terminal; elsewhere a line at every log point: step, loss, rate, time left."""

    def __init__(self, start, total, enabled=True):
        self.stream = sys.stderr
        self.start, self.total = start, total
        self.plain = enabled and not self.stream.isatty()
        self.t0 = time.time()
        self.bar = tqdm(desc="train", unit="step", dynamic_ncols=True, initial=start, total=total,
                        disable=not enabled or self.plain, file=self.stream)

    def update(self, steps=1):
        self.bar.update(steps)

    def log(self, step, loss, lr):
        if not self.plain:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            return
        rate = (step - self.start) / max(time.time() - self.t0, 1e-9)
        left = (self.total - step) / rate if rate > 0 else 0.0
        print(f"step {step}/{self.total} ({100 * step / self.total:.0f}%)  loss {loss:.4f}  lr {lr:.2e}  "
              f"{rate:.1f} steps/s  {format_duration(left)} left", file=self.stream, flush=True)

    def write(self, line):
        """A result (an evaluation's) on stdout, without tearing the bar."""
        if self.plain:
            print(line, flush=True)
        else:
            self.bar.write(line)

    def close(self):
        self.bar.close()


def format_duration(seconds):
    seconds = round(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def end_line(out, world, done, total_steps, saved_step, rate, elapsed, loss, log_path):
    """train.py's last line: how an interrupted run goes on, or what a finished one took."""
    if done < total_steps:
        launcher = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
        return (f"interrupted: step {saved_step} of {total_steps} saved in {out}; "
                f"continue with: {launcher} train.py --resume {out}")
    return (f"done: {total_steps} steps in {elapsed:.0f}s ({rate:.1f} steps/s), final loss {loss:.4f}, "
            f"checkpoint {out}, log {log_path}")


def data_line(path, data, env_id, device, bf16, scale, top_pct, reward_mode, relabelled_with):
    """train.py's data: line: what it trains on, how it sees the rewards (`scale`), where it runs."""
    kept = f" (the best {top_pct:g}% of {data.episodes_in_file})" if top_pct < 100 else ""
    notes = ", rewards delayed to each episode's end" if reward_mode == "delayed" else ""
    if data.relabelled_goal:
        x, y = data.relabelled_goal
        notes += f", rewards relabelled against the evaluation goal ({x:g}, {y:g}) as D4RL's maze2d"
    if relabelled_with:
        notes += f", returns-to-go relabelled with the V of {relabelled_with} (QDT)"
    return (f"data: {path}: {data.num_steps} steps in {len(data.episode_returns)} episodes{kept}, "
            f"mean return {data.episode_returns.mean():.1f}{notes}; {scale}; env {env_id}; "
            f"device {device}, {'bf16 autocast' if bf16 else 'fp32'}")
