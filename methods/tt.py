"""
The Trajectory Transformer (Janner, Li and Levine 2021, arXiv:2106.02039), written out by hand: a
GPT over whole transitions, every dimension a discrete token, that *plans* with beam search
instead of imitating a target return (`python train.py --model tt`).

Each dimension of a transition (state, action, reward, value) is cut into N = 100 bins at its
quantiles in the data, so a transition of S + A + 2 numbers is S + A + 2 tokens, each from its
dimension's own vocabulary of N bins plus a termination token. The model reads them in order and
predicts each token from the ones before it, like a language model:

    token:     s_1^1  ..  s_1^S  a_1^1  ..  a_1^A  r_1   V_1    s_2^1  ..
    predicts:  s_1^2  ..  a_1^1  a_1^2  ..  r_1    V_1   s_2^1  s_2^2  ..
    (s^i: the i-th dimension of the state, one token; each position predicts the next token)

    V_t = r_{t+1} + γ r_{t+2} + γ² r_{t+3} + ..., what the rest of the episode earns

No token may look at a V token: inside the data V is a label to predict, and when planning the
context's V are unknown (the paper masks them too). After a true termination (a body that fell)
every token is the termination token, and the falling step's reward is -100 (the paper's
termination penalty), so a predicted fall looks like what it costs.

Planning with it, beam search as in the paper, is plan.py.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Block

TERMINATION_PENALTY = -100.0  # the paper's reward for the step that ends an episode by falling


@dataclass
class TTConfig:
    kind: str = "tt"
    state_dim: int = 11
    act_dim: int = 3
    n_bins: int = 100          # N, per dimension
    n_transitions: int = 10    # transitions in a training window (the paper's sequence length)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.1
    action_weight: float = 5.0  # the paper weighs the action tokens' loss by 5
    discount: float = 0.99      # gamma of V

    @property
    def transition_dim(self):
        return self.state_dim + self.act_dim + 2


class Discretizer:
    """Per-dimension quantile bins: N + 1 edges at evenly spaced quantiles of the data, so every
    bin holds about as many of the data's values. A value is encoded as the bin it falls in, and
    decoded as that bin's midpoint, at most half a bin width away."""

    def __init__(self, edges):
        self.edges = torch.as_tensor(edges, dtype=torch.float32)  # (N + 1, D)

    @classmethod
    def fit(cls, values, n_bins):
        """values (rows, D) -> bins at the quantiles 0, 1/N, ..., 1 of each column."""
        ordered = np.sort(np.asarray(values, np.float64), axis=0)
        picks = np.linspace(0, len(ordered) - 1, n_bins + 1).round().astype(int)
        return cls(ordered[picks])

    @property
    def n_bins(self):
        return self.edges.shape[0] - 1

    def encode(self, x, dims=slice(None)):
        """(..., d) values -> (..., d) bin indices in [0, N), for the dimensions `dims`."""
        edges = self.edges[:, dims].to(x.device)
        inner = edges[1:-1].T.contiguous()  # (d, N - 1): a value above k inner edges is in bin k
        flat = x.reshape(-1, inner.shape[0]).T.contiguous()
        bins = torch.searchsorted(inner, flat, right=True).T
        return bins.reshape(x.shape)

    def centres(self, dims=slice(None)):
        """(N, d) midpoints of the bins."""
        edges = self.edges[:, dims]
        return (edges[1:] + edges[:-1]) / 2

    def decode(self, bins, dims=slice(None)):
        """(..., d) bin indices -> (..., d) values, each its bin's midpoint (a termination token
        decodes as the last bin)."""
        centres = self.centres(dims).to(bins.device)
        return centres[bins.clamp(max=self.n_bins - 1), torch.arange(centres.shape[1], device=bins.device)]


def attention_mask(length, transition_dim, device, offset=0):
    """(length_q, length_k) bool, True where a query may look: earlier-or-equal positions, never a
    V token (the last of each transition). Positions count from the window's first token, which is
    always a transition's first state token; the queries are the last `length - offset`."""
    pos = torch.arange(length, device=device)
    causal = pos[offset:, None] >= pos[None, :]
    return causal & (pos % transition_dim != transition_dim - 1)[None, :]


class TrajectoryTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, V = cfg.transition_dim, cfg.n_bins + 1  # the vocabulary of a dimension: N bins, termination
        self.block_size = cfg.n_transitions * D
        # Each dimension its own slice of one embedding table, and its own output head.
        self.embed_token = nn.Embedding(D * V, cfg.n_embd)
        self.embed_position = nn.Parameter(torch.zeros(self.block_size, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Parameter(torch.randn(D, cfg.n_embd, V) * 0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def embed(self, tokens, start):
        """(B, T) tokens whose first is at window position `start` -> (B, T, C)."""
        T, D = tokens.shape[1], self.cfg.transition_dim
        dim = (torch.arange(start, start + T, device=tokens.device) % D)
        x = self.embed_token(tokens + dim * (self.cfg.n_bins + 1)) + self.embed_position[start:start + T]
        return self.drop(x)

    def logits(self, x, start):
        """Hidden states (B, T, C) at positions start.. -> (B, T, N + 1): each position through the
        head of the dimension it predicts, the next token's. Position p predicts dimension
        (p + 1) % D, so after (start + 1) % D blank positions in front every row of D positions
        lines up with the D heads: one batched matmul, with no indexing into the heads (whose
        backward would add up gradients in a thread-dependent order)."""
        B, T, C = x.shape
        D = self.cfg.transition_dim
        front = (start + 1) % D
        back = -(front + T) % D
        x = F.pad(self.ln_f(x), (0, 0, front, back))               # (B, front + T + back, C)
        logits = torch.einsum("bndc,dcv->bndv", x.view(B, -1, D, C), self.head)
        return logits.reshape(B, -1, logits.shape[-1])[:, front:front + T]

    def forward(self, tokens):
        """(B, T) tokens of a window that starts at a transition -> logits (B, T, N + 1)."""
        x = self.embed(tokens, 0)
        mask = attention_mask(tokens.shape[1], self.cfg.transition_dim, tokens.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.logits(x, 0)

    @torch.no_grad()
    def extend(self, tokens, cache=None):
        """Feed (B, T) more tokens after those in `cache` (a KVCache; None starts a window) and
        return their logits (B, T, N + 1) and the cache, which now holds them too. The same
        numbers as forward() on the whole window, for one pass over the new tokens only."""
        cache = cache or KVCache(self, tokens.shape[0], tokens.device)
        start = cache.position
        x = self.embed(tokens, start)
        mask = attention_mask(start + tokens.shape[1], self.cfg.transition_dim, tokens.device, offset=start)
        for layer, block in enumerate(self.blocks):
            attn = block.attn
            B, T, C = x.shape
            q, k, v = attn.qkv(block.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
            y = cache.attend(layer, q, k, v, mask)
            x = x + attn.proj(y.transpose(1, 2).reshape(B, T, C))
            x = x + block.mlp(block.ln_2(x))
        cache.length += tokens.shape[1]
        return self.logits(x, start), cache


class KVCache:
    """Every layer's keys and values for B token sequences, kept as planning needs them. The
    sequences may come in G equal groups (an episode's beams) that begin with the same `shared`
    tokens (the episode's history), whose keys and values are then kept once per group,
    (G, heads, shared, head size). Each sequence's own tokens after them go in a
    (B, heads, window - shared, head size) buffer filled up to `length`: a new token writes its
    row, nothing already there is copied, and keeping or repeating sequences copies only their own
    filled rows, not the history every beam of an episode has in common."""

    def __init__(self, model, batch, device):
        cfg = model.cfg
        shape = (batch, cfg.n_head, model.block_size, cfg.n_embd // cfg.n_head)
        self.keys = [torch.zeros(shape, device=device) for _ in model.blocks]
        self.values = [torch.zeros(shape, device=device) for _ in model.blocks]
        self.shared_keys, self.shared_values = [], []
        self.shared, self.length = 0, 0

    @property
    def position(self):
        """The window position of the next token."""
        return self.shared + self.length

    def share(self, copies):
        """Every sequence so far becomes the shared beginning of a group of `copies` sequences."""
        assert not self.shared, "a cache is shared once"
        self.shared_keys = [k[:, :, :self.length] for k in self.keys]
        self.shared_values = [v[:, :, :self.length] for v in self.values]
        B, n_head, window, head_size = self.keys[0].shape
        shape = (B * copies, n_head, window - self.length, head_size)
        self.keys = [k.new_zeros(shape) for k in self.keys]
        self.values = [v.new_zeros(shape) for v in self.values]
        self.shared, self.length = self.length, 0

    def take(self, rows):
        """Keep (and repeat) the sequences `rows`, a (B',) index that keeps the groups in order and
        of equal size (plan's expansions and its top W per episode do)."""
        self.keys = [self._gathered(k, rows) for k in self.keys]
        self.values = [self._gathered(v, rows) for v in self.values]

    def _gathered(self, buffer, rows):
        out = buffer.new_empty((len(rows), *buffer.shape[1:]))
        out[:, :, :self.length] = buffer[:, :, :self.length].index_select(0, rows)
        return out

    def attend(self, layer, q, k, v, mask):
        """Write the new tokens' keys and values, (B, heads, T, head size), after the cached ones
        and return the attention output of their queries q over the group's shared tokens and the
        sequence's own; mask (T, shared + length + T) says which each may see. Written out: for a
        token or two against a window of cached keys, the fused kernel's set-up costs more than
        the arithmetic (3x slower here on a CPU)."""
        end = self.length + q.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, self.length:end], values[:, :, self.length:end] = k, v
        root = math.sqrt(q.shape[-1])
        scores = (q @ keys[:, :, :end].transpose(-2, -1)) / root  # (B, heads, T, end)
        if self.shared:
            shared_scores = self._per_group(q, self.shared_keys[layer].transpose(-2, -1)) / root
            scores = torch.cat((shared_scores, scores), dim=-1)
        probs = scores.masked_fill(~mask, -math.inf).softmax(-1)
        y = probs[..., self.shared:] @ values[:, :, :end]
        if self.shared:
            y = y + self._per_group(probs[..., :self.shared], self.shared_values[layer])
        return y

    @staticmethod
    def _per_group(x, shared):
        """x (B, heads, T, n) @ shared (G, heads, n, m) -> (B, heads, T, m), each sequence against its
        group's matrix: one matmul per group and head, the group's rows stacked."""
        G, (B, H, T, n) = shared.shape[0], x.shape
        stacked = x.reshape(G, B // G, H, T, n).transpose(1, 2).reshape(G, H, B // G * T, n)
        out = stacked @ shared
        return out.view(G, H, B // G, T, -1).transpose(1, 2).reshape(B, H, T, -1)


def weighted_token_loss(logits, targets, mask, cfg):
    """Cross-entropy of every predicted token, the action tokens weighted by cfg.action_weight,
    averaged over the tokens the mask keeps. logits (B, T, N + 1); targets and mask (B, T), the
    target at position t being token t + 1."""
    D = cfg.transition_dim
    dim = torch.arange(1, targets.shape[1] + 1, device=targets.device) % D
    weight = torch.where((dim >= cfg.state_dim) & (dim < cfg.state_dim + cfg.act_dim), cfg.action_weight, 1.0)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    m = mask.to(ce.dtype)
    return (ce * weight * m).sum() / m.sum()


class Objective(nn.Module):
    """TT's training forward: a batch of token windows in, weighted_token_loss out; under `amp`
    for the matmuls, the loss in fp32."""

    def __init__(self, model, amp):
        super().__init__()
        self.model, self.amp = model, amp

    def forward(self, inputs, targets, mask):
        with self.amp:
            logits = self.model(inputs)
        return weighted_token_loss(logits.float(), targets, mask, self.model.cfg)


# --- the data: transitions as tokens ------------------------------------------------------------

@dataclass
class TokenData:
    tokens: torch.Tensor       # (N, D) int64 bins of (s, a, r, V) of every step
    last: torch.Tensor         # (N,) int64, flat index of the last step of the step's episode
    terminal_end: torch.Tensor  # (N,) bool, whether that episode ended by a true termination

    def to(self, device):
        return TokenData(self.tokens.to(device), self.last.to(device), self.terminal_end.to(device))


def transitions_table(data, discount):
    """(rows (N, D) float64 of (s, a, r, V), last index (N,), terminal end (N,)) of Trajectories
    (data.py). r: the reward as trained on (dense or delayed), the falling step's
    replaced by TERMINATION_PENALTY; V_t: the discounted sum of the episode's rewards after t."""
    states, actions = data.states.cpu().numpy(), data.actions.cpu().numpy()
    start = data.episode_start.cpu().numpy()
    n = len(start)
    episode_last = np.flatnonzero(np.r_[start[1:] != start[:-1], True])
    last = episode_last[np.searchsorted(episode_last, np.arange(n))]
    fell = data.terminals.cpu().numpy()
    rewards = np.where(fell, TERMINATION_PENALTY, data.rewards.cpu().numpy().astype(np.float64))
    value = np.zeros(n)
    for i in range(n - 2, -1, -1):  # once at load time
        if last[i] != i:
            value[i] = rewards[i + 1] + discount * value[i + 1]
    rows = np.concatenate([states, actions, rewards[:, None], value[:, None]], axis=1)
    return rows, last, fell[last]


def tokenize(data, cfg):
    """Trajectories -> (TokenData, the Discretizer fitted on them)."""
    rows, last, terminal_end = transitions_table(data, cfg.discount)
    discretizer = Discretizer.fit(rows, cfg.n_bins)
    tokens = discretizer.encode(torch.as_tensor(rows, dtype=torch.float32))
    return TokenData(tokens, torch.as_tensor(last), torch.as_tensor(terminal_end)), discretizer


def describe(data):
    """The data: line's word on how TT sees the data."""
    falls = f", reward {TERMINATION_PENALTY:g} for a fall" if bool(data.terminals.any()) else ""  # a maze has none
    return f"{data.tt_config.n_bins} bins a dimension, {data.tt_config.transition_dim} tokens a transition{falls}"


def prepare(data, n_layer, n_head, n_embd, dropout):
    """train.py's hook, once before training: the model's config, the data as tokens, and the bins,
    which go into the data's normalization since every rollout must encode with them."""
    data.tt_config = TTConfig(state_dim=data.state_dim, act_dim=data.act_dim, n_layer=n_layer, n_head=n_head,
                              n_embd=n_embd, dropout=dropout)
    tokens, discretizer = tokenize(data, data.tt_config)
    data.tokens = tokens.to(data.states.device)
    data.norm.bins = discretizer.edges.to(data.states.device)


def sample_windows(tokens, cfg, batch_size, generator=None):
    """A batch of n_transitions-step windows of tokens, each starting at a uniformly drawn step.
    Rows past the episode's end are termination tokens: trained on where
    the episode truly ended, masked out where the time limit cut it (it would have gone on).
    Returns (inputs, targets, mask), each (B, n_transitions * D - 1)."""
    device, N, D, K = tokens.tokens.device, cfg.n_bins, cfg.transition_dim, cfg.n_transitions
    first = torch.randint(0, len(tokens.last), (batch_size,), device=device, generator=generator)
    idx = first[:, None] + torch.arange(K, device=device)        # (B, K)
    beyond = idx > tokens.last[first][:, None]
    rows = tokens.tokens[idx.clamp(max=len(tokens.last) - 1)]      # (B, K, D)
    rows = torch.where(beyond[..., None], N, rows).flatten(1)
    keep = (~beyond | tokens.terminal_end[first][:, None]).repeat_interleave(D, dim=1)
    return rows[:, :-1], rows[:, 1:], keep[:, 1:]
