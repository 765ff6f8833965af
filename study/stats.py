"""
Intervals for scores from a few seeds of a few episodes each, after Agarwal et al. 2021 ("Deep RL
at the edge of the statistical precipice"): a mean is reported with a 95% bootstrap confidence
interval that resamples the training seeds and then the episodes within each, and a method's
summary over many tasks is the interquartile mean (IQM) of its runs, with a stratified bootstrap
interval. Three seeds of ten episodes are a small sample; these intervals say how small.
"""
import numpy as np


def bootstrap_mean(runs, level=95.0, draws=10_000, seed=0):
    """(mean, low, high) of the mean episode score. `runs`: one sequence of episode scores per
    training seed, all the same length. Each draw picks as many seeds as there are, with
    replacement, then as many episodes within each picked seed, with replacement: both kinds of
    luck, which seed and which episodes, widen the interval."""
    scores = np.asarray(runs, dtype=float)  # (seeds, episodes)
    k, n = scores.shape
    rng = np.random.default_rng(seed)
    picked = rng.integers(0, k, (draws, k))                  # (draws, k) seeds
    episodes = rng.integers(0, n, (draws, k, n))             # (draws, k, n) episodes of each
    means = scores[picked[..., None], episodes].mean(axis=(1, 2))
    return (scores.mean(), *percentile_interval(means, level))


def iqm(values):
    """The mean of the middle half: a quarter of the values cut from each end (as scipy's
    trim_mean(values, 0.25)). Robust to one run that flipped, unlike the mean; less noisy than the
    median, which keeps one or two values."""
    x = np.sort(np.asarray(values, dtype=float))
    cut = int(0.25 * len(x))
    return x[cut:len(x) - cut].mean()


def bootstrap_iqm(runs_by_task, level=95.0, draws=10_000, seed=0):
    """(IQM, low, high) of run scores pooled over tasks. `runs_by_task`: {task: run scores}. Each
    draw resamples the runs within every task (stratified: each task keeps its number of runs), then
    takes the IQM of all of them together."""
    rng = np.random.default_rng(seed)
    tasks = [np.asarray(v, dtype=float) for v in runs_by_task.values()]
    pooled = np.concatenate(tasks)
    resampled = np.concatenate([t[rng.integers(0, len(t), (draws, len(t)))] for t in tasks], axis=1)
    resampled.sort(axis=1)
    cut = int(0.25 * resampled.shape[1])
    iqms = resampled[:, cut:resampled.shape[1] - cut].mean(axis=1)
    return (iqm(pooled), *percentile_interval(iqms, level))


def percentile_interval(estimates, level):
    tail = (100.0 - level) / 2
    low, high = np.percentile(estimates, [tail, 100.0 - tail])
    return float(low), float(high)


def overlaps(a, b):
    """Whether two (estimate, low, high) intervals overlap: then the data cannot rank the two."""
    return a[1] <= b[2] and b[1] <= a[2]
