"""
Implicit Q-Learning (Kostrikov, Nair and Levine 2021, arXiv:2110.06169): the value-based offline RL
method the DT is compared with, `python train.py --model iql`.

Where the DT conditions on the return that followed each step, IQL learns what each action is
worth by Bellman backups, Q(s, a) = r + gamma * V(s'), and then clones the data's actions weighted
by how much better than usual they were, exp(beta * (Q - V)). It never asks Q about an action
outside the data: V is fitted to the data's own Q values by an expectile, which is what makes it
safe offline. It trains on transitions (s, a, r, s', done): `prepare` builds them from the DT's
Trajectories (data.py) once, sample_transitions draws them.
"""
import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn


@dataclass
class IQLConfig:
    """IQL's own settings, the paper's MuJoCo values (train.py --expectile etc.)."""
    expectile: float = 0.7    # the expectile V is fitted to
    temperature: float = 3.0  # beta in the actor's weights exp(beta (Q - V))
    discount: float = 0.99    # gamma of the Bellman backups
    tau: float = 0.005        # Polyak rate of the target Q networks

    def problem(self):
        """What is wrong with these settings, or None."""
        if not (0 < self.expectile < 1 and self.temperature >= 0 and 0 <= self.discount < 1 and 0 < self.tau <= 1):
            return "iql needs 0 < --expectile < 1, --temperature >= 0, 0 <= --discount < 1 and 0 < --tau <= 1"
        return None


def mlp(sizes):
    """Linear layers with ReLU between them: sizes (in, hidden..., out)."""
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class IQL(nn.Module):
    """Three MLPs of n_layer hidden layers of n_embd (the paper: 2 x 256): twin Q (the minimum of
    two curbs over-estimation), V, and a Gaussian actor whose mean is the policy's action. The
    target Q networks (a slow Polyak average of Q) are part of the state dict, so a resumed run
    continues exactly. The loss is iql_loss below."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        S, A, hidden = cfg.state_dim, cfg.act_dim, [cfg.n_embd] * cfg.n_layer
        self.q1, self.q2 = mlp([S + A, *hidden, 1]), mlp([S + A, *hidden, 1])
        self.q1_target, self.q2_target = copy.deepcopy(self.q1), copy.deepcopy(self.q2)
        for p in (*self.q1_target.parameters(), *self.q2_target.parameters()):
            p.requires_grad_(False)
        self.v = mlp([S, *hidden, 1])
        self.actor = mlp([S, *hidden, A])
        self.log_std = nn.Parameter(torch.zeros(A))  # state-independent, as in the paper

    def q(self, states, actions, target=False):
        """(Q1, Q2) of (B, S) states and (B, A) actions, each (B,); the target networks' if asked."""
        sa = torch.cat((states, actions), dim=-1)
        q1, q2 = (self.q1_target, self.q2_target) if target else (self.q1, self.q2)
        return q1(sa).squeeze(-1), q2(sa).squeeze(-1)

    def value(self, states):
        return self.v(states).squeeze(-1)

    def advantage(self, states, actions, v):
        """Q - V of the data's actions, (B,): how much better each did than V(s) = v expects. Q is
        the smaller of the two target networks' and carries no gradient; v's passes through, for
        V's own loss."""
        with torch.no_grad():
            q = torch.min(*self.q(states, actions, target=True))
        return q - v

    def forward(self, states):
        """The policy's action for (B, S) states: the Gaussian's mean, squashed into [-1, 1]."""
        return torch.tanh(self.actor(states))

    def log_prob(self, states, actions):
        """log pi(a | s) of the data's actions under the Gaussian actor, (B,)."""
        std = self.log_std.clamp(-5.0, 2.0).exp()
        return torch.distributions.Normal(self(states), std).log_prob(actions).sum(-1)

    @torch.no_grad()
    def update_targets(self, tau):
        """target <- (1 - tau) * target + tau * online, for both Q networks."""
        online = [*self.q1.parameters(), *self.q2.parameters()]
        target = [*self.q1_target.parameters(), *self.q2_target.parameters()]
        torch._foreach_lerp_(target, online, tau)

    @torch.no_grad()
    def get_action(self, states, actions, returns_to_go, timesteps, mask=None):
        return self(states[:, -1])  # the current state alone: no history, no return


def iql_loss(model, batch, cfg):
    """IQL's three losses in one sum. Each trains one network and sees the others' outputs only
    through torch.no_grad or .detach(), so one backward pass gives every network exactly its own
    gradient, as three separate updates from the same parameters would (CORL's order).
    batch: states (B,S), actions (B,A), rewards (B,), next states (B,S), terminals (B,); cfg an IQLConfig."""
    s, a, r, s_next, terminal = batch
    with torch.no_grad():
        v_next = model.value(s_next)
    v = model.value(s)
    advantage = model.advantage(s, a, v)
    value_loss = expectile_loss(advantage, cfg.expectile)
    # Q: one Bellman backup, r + gamma V(s'), with no bootstrap past a true termination.
    td_target = r + cfg.discount * (1.0 - terminal) * v_next
    q1, q2 = model.q(s, a)
    q_loss = ((q1 - td_target) ** 2 + (q2 - td_target) ** 2).mean() / 2
    # Actor: clone the data's actions, each weighted by how much better than V it did.
    weight = actor_weights(advantage.detach(), cfg.temperature)
    actor_loss = -(weight * model.log_prob(s, a)).mean()
    return value_loss + q_loss + actor_loss


def expectile_loss(diff, expectile):
    """V's loss: expectile regression on diff = Q - V, |expectile - 1(diff < 0)| * diff^2. An
    expectile above one half weighs Q > V more than Q < V, so V follows the better actions the
    data holds (0.5 would be the mean), without ever evaluating an action the data lacks."""
    return ((expectile - (diff < 0).float()).abs() * diff ** 2).mean()


WEIGHT_CAP = 100.0


def actor_weights(advantage, temperature):
    """How much the actor clones each data action: exp(temperature * (Q - V)), capped at WEIGHT_CAP
    so that one transition whose advantage the critics over-estimate cannot dominate a batch."""
    return torch.exp(temperature * advantage).clamp(max=WEIGHT_CAP)


class Objective(nn.Module):
    """IQL's training forward: a batch of transitions in, iql_loss out. The DT's training step goes
    through its model's forward; IQL's calls its networks one by one, so this module gives it a
    forward of its own, which is what DistributedDataParallel (gradients averaged during backward)
    and torch.compile wrap. It holds the model, not a copy: the optimizer sees the same weights."""

    def __init__(self, model, cfg):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, states, actions, rewards, next_states, terminals):
        return iql_loss(self.model, (states, actions, rewards, next_states, terminals), self.cfg)


def actor_lr(step, total_steps, max_lr):
    """The IQL paper's schedule: the actor's learning rate decays from max_lr to 0 along a cosine;
    Q and V keep max_lr."""
    return max_lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def configure_optimizer(model, lr):
    """Adam, as in the paper (no weight decay). Q and V keep `lr`; the actor's group follows
    actor_lr. Fused: one kernel updates every parameter, on the CPU as on a GPU."""
    critics = [*model.q1.parameters(), *model.q2.parameters(), *model.v.parameters()]
    return torch.optim.Adam([{"params": critics, "schedule": "constant"},
                             {"params": [*model.actor.parameters(), model.log_std]}], lr=lr, fused=True)


# --- IQL's data: transitions (s, a, r, s', done) ---------------------------------------------

def iql_reward_scale(episode_returns, sparse):
    """IQL's factor on the rewards. For the MuJoCo bodies, the IQL paper's 1000 / (best - worst
    episode return), so that values have the same size whatever the body and the data's spread of
    returns. A sparse maze's rewards are already 0 or 1 a step, so V is at most 1 / (1 - gamma) =
    100 for a policy that reaches the goal and stays; the bodies' rule would multiply them by
    about 16 (the best maze episode earns about 60) for no gain. CORL's IQL trains maze2d on the
    raw rewards too."""
    if sparse:
        return 1.0
    return 1000.0 / max(float(np.ptp(episode_returns)), 1.0)


def next_states(states, last, final_next=None):
    """s' of every step: the next row of the same episode. The last step of an episode has no next
    row. Where the MDP ended (a body that fell) s' is never used: the TD target does not bootstrap
    past a terminal. Where the time limit cut the episode it must bootstrap, since the body would
    have run on; the file's next_observations give the true s' when present (D4RL's own files,
    Minari's), and otherwise the step's own state stands in for it: one step (0.008 to 0.05 s of
    simulated time) moves a body little, so V(s_T) is close to V(s_T+1). Dropping the step instead
    would lose its reward: under delayed rewards, the episode's whole return."""
    idx = np.arange(1, len(states) + 1)
    idx[last] = last
    out = states[idx]
    if final_next is not None:  # (E, S): the file's s' after each episode's last step
        out[last] = final_next
    return out


@dataclass
class Transitions:
    """IQL's view of the data, every step one (s, a, r, s', done); s and a are the Trajectories'."""
    rewards: torch.Tensor      # (N,) float32, dense or delayed, times `reward_scale`
    next_states: torch.Tensor  # (N, S) float32, normalized
    terminals: torch.Tensor    # (N,) float32, 1 where the episode truly ended: no bootstrap
    reward_scale: float        # the factor on the file's rewards in `rewards`


def prepare(data, reward_mode):
    """train.py's hook, once before training: data.transitions from the Trajectories."""
    ends = data.episode_ends().cpu().numpy()
    scale = iql_reward_scale(data.episode_returns, data.sparse)
    given = None if data.final_next_states is None else data.final_next_states.cpu().numpy()
    nxt = next_states(data.states.cpu().numpy(), np.flatnonzero(ends), given)
    # A delayed-reward episode is over once its return is paid: its last step is terminal.
    done = ends if reward_mode == "delayed" else data.terminals.cpu().numpy()
    device = data.states.device
    data.transitions = Transitions(rewards=data.rewards * scale, next_states=torch.from_numpy(nxt).to(device),
                                   terminals=torch.as_tensor(done, dtype=torch.float32, device=device),
                                   reward_scale=scale)


def sample_transitions(data, batch_size, generator=None):
    """IQL's batch: (s, a, r, s', done) at uniformly drawn steps, each (B, ...)."""
    i = torch.randint(0, data.num_steps, (batch_size,), device=data.states.device, generator=generator)
    t = data.transitions
    return data.states[i], data.actions[i], t.rewards[i], t.next_states[i], t.terminals[i]
