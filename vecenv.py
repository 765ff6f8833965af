"""
The environments a rollout steps: a gymnasium vector env in this process, or, with workers > 1,
the same environments stepped by several processes at once. That is for evaluations with hundreds
of episodes side by side, where stepping them one after another takes longer than the policy's
batched forward (on a GPU, at 1,000 episodes, it would take almost all of the time).

gymnasium's AsyncVectorEnv gives every environment a process of its own, 1,000 processes for 1,000
episodes. Here each of a few worker processes steps a contiguous share of the episodes in a
gymnasium SyncVectorEnv, and every step the parent sends each worker its share of the actions and
gathers what comes back. Episode i is still reset with seed + i, so the episodes are exactly those
one process would run (test_sharded_envs_step_exactly_as_one_process).
"""
import multiprocessing
import signal
import sys

import gymnasium as gym
import numpy as np

from checkpoint import RunError
from tasks import TaskError, import_gym


def make_envs(task, num_envs, recorder=None, workers=1):
    """`num_envs` copies of a tasks.Task's environment, stepped together. A video.Recorder films
    env 0, which must then live in this process."""
    if workers > 1:
        if recorder:
            raise RunError("a video is recorded in this process: leave out the environment workers")
        return ShardedVectorEnv(task, num_envs, workers)
    try:
        import_gym(task.env_id)  # registers gymnasium-robotics' mazes when the task is one
    except TaskError as e:
        raise RunError(str(e)) from None

    quiet_mujoco()
    kwargs = dict(task.env_kwargs)
    if task.max_episode_steps:
        kwargs["max_episode_steps"] = task.max_episode_steps
    # Rendering is set up in every env but costs nothing until render() is called (on env 0 only).
    if recorder:
        kwargs.update(recorder.env_kwargs(task))
    # A dict observation (a maze's: position and velocity, and the goal) is cut down to the part
    # the policy was trained on.
    wrappers = [lambda env: ObservationPart(env, task.observation_key)] if task.observation_key else None
    try:
        envs = gym.make_vec(task.env_id, num_envs=num_envs, vectorization_mode="sync", wrappers=wrappers, **kwargs)
    except gym.error.Error as e:
        raise RunError(f"cannot make environment {task.env_id!r}: {e}") from None
    if recorder:
        recorder.prepare(envs.envs[0])
    return envs


def quiet_mujoco():
    """MuJoCo 4 warns on every load of HalfCheetah's XML that `settotalmass` is deprecated; it is
    gymnasium's model file, not something a user can act on. Other MuJoCo warnings still print."""
    import mujoco

    def warn(msg):
        if "settotalmass" not in msg:
            print(f"MuJoCo warning: {msg}", file=sys.stderr)

    mujoco.set_mju_user_warning(warn)


class ObservationPart(gym.ObservationWrapper):
    """One entry of a dict observation, as the observation."""

    def __init__(self, env, key):
        super().__init__(env)
        self.key = key
        self.observation_space = env.observation_space[key]

    def observation(self, observation):
        return observation[self.key]


class ShardedVectorEnv:
    """`num_envs` copies of a task's environment split over `workers` processes, with the parts of a gymnasium
    vector env's interface that rollout.py uses: reset(seed), step(actions), close(), spec and the
    single spaces."""

    def __init__(self, task, num_envs, workers):
        workers = min(workers, num_envs)
        self.bounds = np.linspace(0, num_envs, workers + 1).astype(int)  # worker w: [bounds[w], bounds[w + 1])
        # spawn, not fork: a forked child would inherit torch's thread pools mid-use.
        context = multiprocessing.get_context("spawn")
        self.pipes, self.processes = [], []
        # The workers start with Ctrl-C ignored (a disposition a new process inherits): it is this
        # process's to handle, and when it exits the workers go with it, without a traceback each.
        ctrl_c = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for lo, hi in zip(self.bounds[:-1], self.bounds[1:]):
                ours, theirs = context.Pipe()
                process = context.Process(target=work, args=(theirs, task, hi - lo), daemon=True)
                process.start()
                theirs.close()
                self.pipes.append(ours)
                self.processes.append(process)
        finally:
            signal.signal(signal.SIGINT, ctrl_c)
        self.spec, self.single_observation_space, self.single_action_space = self._gather()[0]

    def reset(self, seed):
        for pipe, lo in zip(self.pipes, self.bounds[:-1]):
            pipe.send(("reset", seed + int(lo)))  # each worker seeds its first episode with seed + lo
        obs = self._gather()
        return np.concatenate(obs), {}

    def step(self, actions):
        for pipe, lo, hi in zip(self.pipes, self.bounds[:-1], self.bounds[1:]):
            pipe.send(("step", actions[lo:hi]))
        obs, reward, terminated, truncated = (np.concatenate(x) for x in zip(*self._gather()))
        return obs, reward, terminated, truncated, {}

    def close(self):
        for pipe in self.pipes:
            try:
                pipe.send(("close", None))
            except OSError:
                pass  # that worker has already gone (a broken pipe)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()

    def _gather(self):
        """Every worker's answer, in order; a worker's failure becomes one RunError."""
        answers = []
        for pipe in self.pipes:
            try:
                kind, answer = pipe.recv()
            except EOFError:
                self.close()
                raise RunError("an environment worker process died") from None
            if kind == "error":
                self.close()
                raise RunError(answer)
            answers.append(answer)
        return answers


def work(pipe, task, num_envs):
    """A worker process: make its share of the environments, then answer the parent's requests
    until told to close."""
    try:
        envs = make_envs(task, num_envs)
    except RunError as e:
        pipe.send(("error", str(e)))
        return
    try:
        pipe.send(("ok", (envs.spec, envs.single_observation_space, envs.single_action_space)))
        while True:
            command, arg = pipe.recv()
            if command == "reset":
                pipe.send(("ok", envs.reset(seed=arg)[0]))
            elif command == "step":
                obs, reward, terminated, truncated, _ = envs.step(arg)
                pipe.send(("ok", (obs, reward, terminated, truncated)))
            else:
                return
    except (EOFError, ConnectionError):
        return  # the parent has gone (Ctrl-C, an error) without saying close: nobody to answer
    finally:
        envs.close()
