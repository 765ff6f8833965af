"""
The other side of bench.py's comparison (docs/speed.md): d3rlpy's DecisionTransformer and IQL at
this code's sizes, timed on the same file, one JSON line out. Run it in its own virtual
environment (pip install d3rlpy==2.8.1 "gymnasium[mujoco]" h5py), alternating with bench.py:

    OMP_NUM_THREADS=1 python -m study.against_d3rlpy data/halfcheetah-expert-v2.hdf5
    OMP_NUM_THREADS=1 python bench.py --eval-episodes 1 100 --steps 30
    OMP_NUM_THREADS=1 python bench.py --model iql --steps 300 --eval-episodes 1

Training is timed as fit(2N steps) minus fit(N steps), so that d3rlpy's set-up is not counted;
evaluation as one 1000-step episode through its stateful wrapper, which acts for one episode at
a time.
"""
import json
import sys
import time

import d3rlpy
import gymnasium as gym
import h5py
import numpy as np


def first_episodes(path, episodes=200):
    """The file's first `episodes` episodes as a d3rlpy MDPDataset."""
    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts")}
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    stop = ends[min(episodes, len(ends)) - 1] + 1
    return d3rlpy.dataset.MDPDataset(*(data[k][:stop] for k in ("observations", "actions", "rewards",
                                                                  "terminals", "timeouts")))


def fit_seconds(algo, dataset, steps):
    t0 = time.perf_counter()
    algo.fit(dataset, n_steps=steps, n_steps_per_epoch=steps, show_progress=False, save_interval=10**9,
             experiment_name=f"bench-{time.time_ns()}")
    return time.perf_counter() - t0


def steps_per_s(make, dataset, n):
    """Steps/s of a fresh algorithm's fit, set-up excluded: 2n steps minus n."""
    return n / (fit_seconds(make(), dataset, 2 * n) - fit_seconds(make(), dataset, n))


def dt():
    # 3 layers, 1 head, 128 wide, K = 20, batch 64, GELU, AdamW with the paper's weight decay and
    # clipping: the DT paper's (and this code's) settings.
    return d3rlpy.algos.DecisionTransformerConfig(
        batch_size=64, context_size=20, num_layers=3, num_heads=1, learning_rate=1e-4, activation_type="gelu",
        encoder_factory=d3rlpy.models.VectorEncoderFactory(hidden_units=[128], exclude_last_activation=True),
        optim_factory=d3rlpy.optimizers.AdamWFactory(weight_decay=1e-4, clip_grad_norm=0.25),
    ).create(device="cpu:0")


def iql():
    # The IQL paper's MuJoCo settings: 2 x 256 MLPs, batch 256, Adam at 3e-4, expectile 0.7, beta 3.
    return d3rlpy.algos.IQLConfig(batch_size=256, actor_learning_rate=3e-4, critic_learning_rate=3e-4,
                                  expectile=0.7, weight_temp=3.0).create(device="cpu:0")


def evaluation_steps_per_s(algo, dataset, target=12000.0, steps=1000):
    """Env steps/s of one HalfCheetah episode through d3rlpy's stateful DT wrapper."""
    algo.build_with_dataset(dataset)
    actor = algo.as_stateful_wrapper(target_return=target)
    env = gym.make("HalfCheetah-v5")
    obs, _ = env.reset(seed=0)
    reward, t0 = 0.0, time.perf_counter()
    for taken in range(1, steps + 1):
        obs, reward, terminated, truncated, _ = env.step(actor.predict(obs, reward))
        if terminated or truncated:
            break
    return taken / (time.perf_counter() - t0)


def main(path):
    dataset = first_episodes(path)
    print(json.dumps({"d3rlpy": d3rlpy.__version__,
                      "dt_steps_per_s": steps_per_s(dt, dataset, 20),
                      "dt_eval_env_steps_per_s": evaluation_steps_per_s(dt(), dataset),
                      "iql_steps_per_s": steps_per_s(iql, dataset, 300)}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m study.against_d3rlpy HALFCHEETAH.hdf5")
    main(sys.argv[1])
