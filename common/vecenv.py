"""
The environments a rollout steps: a gymnasium vector env in this process, or, with workers > 1,
the same environments stepped by several processes at once. That is for evaluations with hundreds
of episodes side by side, where stepping them one after another takes longer than the policy's
batched forward (on a GPU, at 1,000 episodes, it would take almost all of the time).

gymnasium's AsyncVectorEnv gives every environment a process of its own, 1,000 processes for 1,000
episodes. Here each of a few worker processes steps a contiguous share of the episodes in a
gymnasium SyncVectorEnv, reading its actions from shared memory and writing back what the
environments return; a step's messages are one short command each way. Episode i is still reset
with seed + i, so the episodes are exactly those one process would run
(test_sharded_envs_step_exactly_as_one_process). From MANY_EPISODES on, the episodes are two
parts with workers of their own, so that rollout.py can compute one part's actions while the
other part's environments step.
"""
import multiprocessing
import signal
import sys

import gymnasium as gym
import numpy as np

from common.checkpoint import RunError
from common.tasks import TaskError, import_gym


# From this many episodes on, they are stepped in two parts (see rollout.py), and evaluate.py
# gives them one worker process per CPU core: the environments, stepped one after another, then
# cost more than the policy's forward for all of them.
MANY_EPISODES = 100


def parts_of(num_envs):
    """The episodes' parts, [(lo, hi)]: two halves from MANY_EPISODES on, else one. The split
    depends on the episodes only, never on the worker processes, so that the policy sees the same
    batches, and gives the same actions to the last bit, however many processes step them."""
    return [(0, num_envs // 2), (num_envs // 2, num_envs)] if num_envs >= MANY_EPISODES else [(0, num_envs)]


def make_envs(task, num_envs, recorder=None, workers=1):
    """`num_envs` copies of a tasks.Task's environment, stepped together. A video.Recorder films
    env 0, which must then live in this process."""
    if workers > 1:
        if recorder:
            raise RunError("a video is recorded in this process: leave out the environment workers")
        return ShardedVectorEnv(task, num_envs, workers)
    return InProcess(task, num_envs, recorder)


def make_vector_env(task, num_envs, recorder=None):
    """A gymnasium SyncVectorEnv of the task's environment."""
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


class Parted:
    """What InProcess and ShardedVectorEnv share: a vector env's step(actions), made of their
    send(part, actions) and receive(part)."""

    def step(self, actions):
        for part, (lo, hi) in enumerate(self.parts):
            self.send(part, actions[lo:hi])
        obs, reward, terminated, truncated = (np.concatenate(x) for x in
                                              zip(*(self.receive(part) for part in range(len(self.parts)))))
        return obs, reward, terminated, truncated, {}


class InProcess(Parted):
    """The environments in this process: a gymnasium vector env per part of the episodes, with the
    interface rollout.py steps through (send(part, actions) steps a part, receive(part) hands over
    what it returned) and a vector env's reset, step and close."""

    def __init__(self, task, num_envs, recorder=None):
        self.parts = parts_of(num_envs)
        self.vector_envs = [make_vector_env(task, hi - lo, recorder if lo == 0 else None) for lo, hi in self.parts]
        first = self.vector_envs[0]
        self.spec, self.single_observation_space, self.single_action_space = (
            first.spec, first.single_observation_space, first.single_action_space)
        self.envs = [env for envs in self.vector_envs for env in envs.envs]  # env 0 is the one a video films
        self.results = {}

    def reset(self, seed):
        return np.concatenate([envs.reset(seed=seed + lo)[0] for envs, (lo, _) in zip(self.vector_envs, self.parts)]), {}

    def send(self, part, actions):
        self.results[part] = self.vector_envs[part].step(actions)[:4]

    def receive(self, part):
        return self.results.pop(part)

    def close(self):
        for envs in self.vector_envs:
            envs.close()


class ShardedVectorEnv(Parted):
    """`num_envs` copies of a task's environment split over `workers` processes, with InProcess's
    interface.

    Observations, rewards, ends and actions travel through shared memory, not pickled through
    pipes: a step's message is one short command each way. When the episodes are two parts
    (parts_of), each part has half the workers, so that rollout can work out one part's actions
    while the other part's environments step: send(part) returns at once, receive(part) waits
    for that part's workers."""

    def __init__(self, task, num_envs, workers):
        self.parts = parts_of(num_envs)
        # Worker w steps episodes [bounds[w], bounds[w + 1]); groups[p] are part p's workers.
        self.bounds, self.groups = [0], []
        for p, (lo, hi) in enumerate(self.parts):
            mine = max(1, min(hi - lo, (workers + len(self.parts) - 1 - p) // len(self.parts)))
            self.groups.append(range(len(self.bounds) - 1, len(self.bounds) - 1 + mine))
            self.bounds += [int(b) for b in np.linspace(lo, hi, mine + 1)[1:]]
        workers = len(self.bounds) - 1
        probe = make_envs(task, 1)  # the spaces, to size the shared arrays
        self.spec, self.single_observation_space, self.single_action_space = (
            probe.spec, probe.single_observation_space, probe.single_action_space)
        probe.close()
        # spawn, not fork: a forked child would inherit torch's thread pools mid-use.
        context = multiprocessing.get_context("spawn")
        shapes = {"actions": ((num_envs, *self.single_action_space.shape), np.float32),
                  "obs": ((num_envs, *self.single_observation_space.shape), self.single_observation_space.dtype),
                  "reward": ((num_envs,), np.float64), "terminated": ((num_envs,), np.bool_),
                  "truncated": ((num_envs,), np.bool_)}
        raw = {k: (context.RawArray("b", int(np.prod(shape)) * np.dtype(dtype).itemsize), shape, dtype)
               for k, (shape, dtype) in shapes.items()}
        self.shared = {k: shared_array(*r) for k, r in raw.items()}
        self.pipes, self.processes = [], []
        # The workers start with Ctrl-C ignored (a disposition a new process inherits): it is this
        # process's to handle, and when it exits the workers go with it, without a traceback each.
        ctrl_c = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for lo, hi in zip(self.bounds[:-1], self.bounds[1:]):
                ours, theirs = context.Pipe()
                process = context.Process(target=work, args=(theirs, task, raw, lo, hi), daemon=True)
                process.start()
                theirs.close()
                self.pipes.append(ours)
                self.processes.append(process)
        finally:
            signal.signal(signal.SIGINT, ctrl_c)
        self._gather(range(workers))  # every worker has made its environments

    def reset(self, seed):
        for pipe in self.pipes:
            pipe.send(("reset", seed))  # a worker seeds its episode i with seed + i
        self._gather(range(len(self.pipes)))
        return self.shared["obs"].copy(), {}

    def send(self, part, actions):
        lo, hi = self.parts[part]
        self.shared["actions"][lo:hi] = actions
        for w in self.groups[part]:
            self.pipes[w].send(("step", None))

    def receive(self, part):
        self._gather(self.groups[part])
        lo, hi = self.parts[part]
        return tuple(self.shared[k][lo:hi].copy() for k in ("obs", "reward", "terminated", "truncated"))

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

    def _gather(self, workers):
        """Wait for each of these workers' answers; a worker's failure becomes one RunError."""
        for w in workers:
            try:
                kind, answer = self.pipes[w].recv()
            except EOFError:
                self.close()
                raise RunError("an environment worker process died") from None
            if kind == "error":
                self.close()
                raise RunError(answer)


def shared_array(raw, shape, dtype):
    """A numpy view of a multiprocessing.RawArray: the same memory in every process that has it."""
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def work(pipe, task, raw, lo, hi):
    """A worker process: make the environments of episodes [lo, hi), then step them as the parent
    asks, reading their actions from and writing what they return into the shared arrays, until
    told to close."""
    try:
        envs = make_envs(task, hi - lo)
    except RunError as e:
        pipe.send(("error", str(e)))
        return
    mine = {k: shared_array(*r)[lo:hi] for k, r in raw.items()}
    try:
        pipe.send(("ok", None))
        while True:
            command, arg = pipe.recv()
            if command == "reset":
                mine["obs"][:] = envs.reset(seed=arg + lo)[0]
            elif command == "step":
                obs, reward, terminated, truncated, _ = envs.step(mine["actions"])
                mine["obs"][:], mine["reward"][:] = obs, reward
                mine["terminated"][:], mine["truncated"][:] = terminated, truncated
            else:
                return
            pipe.send(("ok", None))
    except (EOFError, ConnectionError):
        return  # the parent has gone (Ctrl-C, an error) without saying close: nobody to answer
    finally:
        envs.close()
