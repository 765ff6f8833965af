"""
Planning with a Trajectory Transformer (tt.py), beam search as in the paper: from the last few real
transitions and the current state, each beam is expanded, its next action sampled token by token
from the most likely tokens that hold 40% of the probability (cdf 0.6), its reward and value read
off as expectations over their bins, its next state the most likely tokens. The beams with the
highest sum of predicted rewards plus discounted value are kept, and the agent takes the first
action of the best plan, re-planning every step (Planner, rollout.py's policy for a TT checkpoint).

A key/value cache (tt.KVCache) makes each generated token one token's work, all episodes' beams
in one batch; an episode's history, the same for all its beams, is read once and its keys and
values shared by them.
"""
import math
from dataclasses import dataclass

import torch

from methods.tt import Discretizer


@dataclass
class PlanSettings:
    """The paper's planning settings (its defaults; it uses horizon 5 for HalfCheetah and Walker2d)."""
    horizon: int = 15      # transitions imagined ahead
    beam_width: int = 128  # plans kept after every transition
    n_expand: int = 2      # continuations sampled from each kept plan
    cdf_act: float = 0.6   # actions come from the most likely tokens that hold the top 40%
    context: int = 5       # real transitions before the current state that a plan starts from

    @classmethod
    def given(cls, beam_width=None, horizon=None):
        """The settings with a command line's --beam-width and --horizon where given."""
        return cls(**{k: v for k, v in (("beam_width", beam_width), ("horizon", horizon)) if v})


def add_planning_flags(parser, whose):
    """--beam-width and --horizon, for the command lines that plan (evaluate.py, bench.py, mazes.py)."""
    parser.add_argument("--beam-width", type=int, help=f"{whose}: plans kept per step (default "
                        f"{PlanSettings.beam_width}, the paper's; fewer plan faster)")
    parser.add_argument("--horizon", type=int, help=f"{whose}: transitions planned ahead (default "
                        f"{PlanSettings.horizon}, the paper's; it uses 5 for HalfCheetah and Walker2d)")


def check_planning_flags(parser, beam_width, horizon):
    """add_planning_flags' values: a plan needs at least one beam and one transition ahead."""
    for flag, value in (("--beam-width", beam_width), ("--horizon", horizon)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, not {value}")


def top_of_distribution(logits, cdf):
    """Logits with every token outside the most likely ones that together hold (1 - cdf) of the
    probability set to -inf: sampling stays among the plausible actions."""
    probs = logits.softmax(-1)
    ordered, _ = probs.sort(-1)  # ascending
    below = ordered.cumsum(-1) < cdf  # the unlikely tail that holds less than `cdf`
    threshold = torch.where(below, ordered, 0.0).max(-1, keepdim=True).values
    likeliest = probs == probs.max(-1, keepdim=True).values  # never masked, whatever the ties
    return logits.masked_fill((probs <= threshold) & ~likeliest, -math.inf)


class Search:
    """Token sequences being generated side by side, each with its key/value cache. When a sequence
    would outgrow the model's window, its oldest whole transitions are dropped and the cache is
    refilled from the rest: the window always starts at a transition's first token, as in training."""

    def __init__(self, model, prefix, context):
        self.model, self.context = model, context
        self.seq = prefix
        self.logits, self.cache = self._refill()

    def _refill(self):
        D = self.model.cfg.transition_dim
        keep = self.seq.shape[1] % D + self.context * D  # the last `context` transitions and the partial one
        logits, cache = self.model.extend(self.seq[:, -keep:] if self.seq.shape[1] > keep else self.seq)
        return logits[:, -1], cache

    def append(self, tokens):
        """(B,) tokens appended to every sequence; self.logits becomes the next token's."""
        self.seq = torch.cat((self.seq, tokens[:, None]), dim=1)
        if self.cache.position + 1 > self.model.block_size:
            self.logits, self.cache = self._refill()
        else:
            logits, self.cache = self.model.extend(tokens[:, None], self.cache)
            self.logits = logits[:, -1]

    def keep(self, rows):
        """Keep (and repeat) the sequences `rows` (a (B',) index), with their caches."""
        self.seq, self.logits = self.seq[rows], self.logits[rows]
        self.cache.take(rows)

    def share(self, copies):
        """Each sequence becomes `copies` identical ones that share its cache so far."""
        self.seq = self.seq.repeat_interleave(copies, dim=0)
        self.logits = self.logits.repeat_interleave(copies, dim=0)
        self.cache.share(copies)


def plan_value(rewards, discount):
    """(..., H + 1) a plan's predicted rewards, its final value last -> (...) their discounted sum:
    what the beams are ranked by."""
    discounts = discount ** torch.arange(rewards.shape[-1], device=rewards.device, dtype=torch.float32)
    return (rewards * discounts).sum(-1)


@torch.no_grad()
def plan(model, disc, prefix, settings, generator=None):
    """Beam search from `prefix` (E, L): each episode's last real transitions and its current state
    as tokens. Returns (E, A) action tokens, the first action of each episode's best plan, and
    (E, H + 1) that plan's predicted rewards, with its final value last."""
    cfg = model.cfg
    E, S, A, N = prefix.shape[0], cfg.state_dim, cfg.act_dim, cfg.n_bins
    W, X, H = settings.beam_width, settings.n_expand, settings.horizon
    centres = disc.centres().to(prefix.device)  # (N, D)
    # The prefix is the same for all of an episode's beams: read once per episode, its keys and
    # values shared by the W beams (for Hopper it is 91 of a plan's 160 tokens).
    search = Search(model, prefix, settings.context)
    search.share(W)
    rewards = torch.zeros(E * W, H + 1, device=prefix.device)
    for h in range(H):
        # Expand every kept plan into X continuations: rows stay grouped by episode.
        search.keep(torch.arange(E * W, device=prefix.device).repeat_interleave(X))
        rewards = rewards.repeat_interleave(X, dim=0)
        for _ in range(A):
            probs = top_of_distribution(search.logits.float(), settings.cdf_act).softmax(-1)
            search.append(torch.multinomial(probs, 1, generator=generator).squeeze(-1))
        # Reward and value: their expectations over the bins (the termination token's share adds
        # nothing), and the most likely token goes into the sequence.
        for slot, dim in ((h, S + A), (h + 1, S + A + 1)):
            probs = search.logits.float().softmax(-1)
            rewards[:, slot] = probs[:, :N] @ centres[:, dim]
            search.append(probs.argmax(-1))
        # Keep the W plans per episode with the highest discounted sum of rewards plus final value.
        score = plan_value(rewards, cfg.discount).view(E, W * X)
        best = score.topk(W, dim=1).indices + torch.arange(E, device=prefix.device)[:, None] * W * X
        search.keep(best.flatten())
        rewards = rewards[best.flatten()]
        if h < H - 1:  # the next state: its most likely tokens
            for _ in range(S):
                search.append(search.logits.argmax(-1))
    # The best plan of each episode is its first row: topk returns them in descending order.
    best_rows = torch.arange(E, device=prefix.device) * W
    start = prefix.shape[1]
    return search.seq[best_rows, start:start + A], rewards[best_rows]


def planning_policy(model, norm, target, episodes, device, *, compile=False, bf16=False, planning=None):
    """checkpoint.MODEL_KINDS' policy for a TT: a Planner with `planning`'s settings, a PlanSettings
    or a dict of beam_width and horizon (the paper's where None). It asks for no target, and plans
    in fp32: beams are ranked by sums of predicted rewards and values."""
    settings = planning if isinstance(planning, PlanSettings) else PlanSettings.given(**(planning or {}))
    return Planner(model, norm, episodes, settings, device)


class Planner:
    """rollout.py's policy for a TT checkpoint: every step, one plan per episode from its last
    `settings.context` real transitions (tokens of state, action, reward, and a placeholder V,
    which no token looks at) and its current state."""

    def __init__(self, model, norm, episodes, settings, device):
        self.model, self.settings = model, settings
        self.disc = Discretizer(norm.bins)  # the bins the model's tokens were made with
        self.history = torch.zeros(episodes, 0, dtype=torch.long, device=device)
        self.generator = torch.Generator(device=device).manual_seed(0)

    def act(self, states, returns, t):
        """(E, S) normalized states -> (E, A) actions (a plan has no use for the returns so far)."""
        self.states = self.disc.encode(states, slice(0, self.model.cfg.state_dim))
        prefix = torch.cat((self.history, self.states), dim=1)
        # The best plan: its first action is taken, and what it expects, (E, H + 1) predicted rewards
        # and final value, is kept (study/tt_falls.py reads it).
        self.actions, self.expected = plan(self.model, self.disc, prefix, self.settings, self.generator)
        S, A = self.model.cfg.state_dim, self.model.cfg.act_dim
        return self.disc.decode(self.actions, slice(S, S + A))

    def observe(self, rewards):
        """The rewards (E,) the last actions earned: the step joins the history."""
        S, A = self.model.cfg.state_dim, self.model.cfg.act_dim
        r = self.disc.encode(torch.as_tensor(rewards, dtype=torch.float32, device=self.states.device)[:, None],
                             slice(S + A, S + A + 1))
        placeholder = torch.full_like(r, self.model.cfg.n_bins - 1)
        step = torch.cat((self.states, self.actions, r, placeholder), dim=1)
        D = self.model.cfg.transition_dim
        self.history = torch.cat((self.history, step), dim=1)[:, -self.settings.context * D:]

    def describe(self):
        return f"planning, beam {self.settings.beam_width}, horizon {self.settings.horizon}"
