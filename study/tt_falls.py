"""
Does the Trajectory Transformer's plan see a fall coming? Plans episodes in the environment of a
TT checkpoint (a body that can fall: Hopper, Walker2d; plan.Planner, all episodes in one batch)
and writes, for every step of every episode, the reward and discounted return its best plan
expected against the reward the step paid and whether the body fell (results/README.md, "Its
plans did not see the falls coming"):

    python -m study.tt_falls runs/hopper-tt-dense-s0.pt --episodes 2 > falls.csv

A foreseen fall shows in the plan as the -100 penalty and termination tokens after it: an expected
return far below the 300-odd of a plan that keeps hopping.
"""
import argparse
import sys

import gymnasium as gym
import numpy as np
import torch

from common.checkpoint import load_checkpoint
from common.tasks import task_from_checkpoint
from methods.plan import Planner, PlanSettings, plan_value


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("checkpoint")
    p.add_argument("--episodes", type=int, default=2)
    p.add_argument("--beam-width", type=int, default=32)
    p.add_argument("--horizon", type=int, default=5)
    args = p.parse_args()
    model, norm, ckpt = load_checkpoint(args.checkpoint)
    model.eval()
    settings = PlanSettings(beam_width=args.beam_width, horizon=args.horizon)
    planner = Planner(model, norm, args.episodes, settings, torch.device("cpu"))
    envs = [gym.make(task_from_checkpoint(ckpt).env_id) for _ in range(args.episodes)]
    obs = np.stack([env.reset(seed=i)[0] for i, env in enumerate(envs)])
    done = np.zeros(args.episodes, bool)
    print("step,episode,expected_reward,expected_return,reward,fell")
    for t in range(envs[0].spec.max_episode_steps):
        actions = planner.act(norm.states(torch.as_tensor(obs, dtype=torch.float32)), None, t).numpy()
        expected_return = plan_value(planner.expected, model.cfg.discount)
        rewards = np.zeros(args.episodes)
        for i, env in enumerate(envs):
            if done[i]:
                continue
            obs[i], rewards[i], fell, cut, _ = env.step(actions[i])
            print(f"{t},{i},{planner.expected[i, 0]:.2f},{expected_return[i]:.1f},{rewards[i]:.2f},{int(fell)}")
            done[i] = fell or cut
        planner.observe(rewards)
        if done.all():
            break


if __name__ == "__main__":
    sys.exit(main())
