"""
A Decision Transformer (Chen et al. 2021, arXiv:2106.01345), written out by hand.

A trajectory is read as a sequence of (return-to-go, state, action) triples. R_t, the return still
to be collected from step t on, is what the user asks for at test time. The three tokens of each
step are interleaved, and a causal transformer predicts each action a_t from the hidden state at
the s_t token:

    token:     R_1  s_1  a_1  R_2  s_2  a_2  ...  R_K  s_K  a_K
    predicts:       a_1            a_2                 a_K

    what the s_2 token may see:  R_1 s_1 a_1 R_2 s_2   (everything up to itself, never a_2)

So a_t is chosen from the returns asked for, the states seen and the actions taken so far. Asking
for a high return at test time is what makes the policy act like the best trajectories in the data.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

@dataclass
class DTConfig:
    kind: str = "dt"  # "dt": the Decision Transformer; with this config also "bc", "iql", "reinformer"
    state_dim: int = 17
    act_dim: int = 6
    context_len: int = 20  # K: timesteps per window, so 3K tokens
    n_layer: int = 3
    n_head: int = 1
    n_embd: int = 128
    dropout: float = 0.1
    max_ep_len: int = 1000  # size of the timestep embedding table


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k and v in one matmul
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    # On a CPU, torch's fused attention kernel does no dropout, so in training SDPA falls back to
    # its reference path, which spends more time on masks and copies than on the arithmetic. The
    # same attention written out (attention_with_dropout) made the TT's step 1.55-1.95x as fast
    # and the DT's 1.07x; bench.py times it against this set to False. On CUDA the fused kernels
    # do dropout, and SDPA is always used.
    written_out_on_cpu = True

    def forward(self, x, attn_mask=None, queries=None):
        """Attention output for every position, or for the positions `queries` (a slice) picks.
        attn_mask: (B, 1, Tq, T) bool, True where a query may see a key; None for plain causal
        attention, or, with `queries`, when those queries may see every key."""
        B, T, C = x.shape  # batch, tokens (3K), embedding width
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C); keys and values for every token
        # (B, T, C) -> (B, nh, T, hs): each head attends on its own slice of the channels.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if queries is not None:
            q = q[:, :, queries]  # (B, nh, Tq, hs)
        if self.written_out_on_cpu and self.training and self.dropout > 0 and x.device.type == "cpu" \
                and queries is None:
            mask = causal_mask(T, x.device) if attn_mask is None else attn_mask
            y = attention_with_dropout(q, k, v, mask, self.dropout)  # (B, nh, T, hs)
        else:
            # Without padding the plain causal kernel is fastest; otherwise the caller's mask says
            # what each query may see (causal *and* not padded).
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and queries is None,
                dropout_p=self.dropout if self.training else 0.0)  # (B, nh, Tq, hs)
        y = y.transpose(1, 2).contiguous().view(B, q.shape[2], C)  # heads side by side again: (B, Tq, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x, attn_mask=None, queries=None):
        """With `queries`, only those positions go on: (B, T, C) -> (B, Tq, C)."""
        y = self.attn(self.ln_1(x), attn_mask, queries)
        x = (x if queries is None else x[:, queries]) + y
        return x + self.mlp(self.ln_2(x))


def attention_with_dropout(q, k, v, attn_mask, p):
    """softmax(q kᵀ / √hs) over the keys attn_mask allows, dropout p on the weights, then @ v: what
    scaled_dot_product_attention computes in training. q (B, nh, Tq, hs), k and v (B, nh, T, hs),
    attn_mask broadcastable to (B, nh, Tq, T) with at least one key a row -> (B, nh, Tq, hs)."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, Tq, T)
    weights = scores.masked_fill(~attn_mask, -math.inf).softmax(-1)
    return F.dropout(weights, p) @ v


def causal_mask(T, device):
    """(1, 1, T, T) boolean mask, True where attention is allowed: each token sees itself and
    the tokens before it."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]


def padded_causal_mask(mask):
    """(B, K) timestep mask -> (B, 1, 3K, 3K) boolean attention mask, True where attention is allowed.

    A query may look at earlier-or-equal positions whose key is real. Every token may also look
    at itself, so a padded query still has one key and softmax never sees an all-masked row
    (which would give NaN); padded outputs are never used.
    """
    B, K = mask.shape
    T = 3 * K
    key_ok = mask.repeat_interleave(3, dim=1)  # one flag per token, same for R, s and a of a step
    eye = torch.eye(T, dtype=torch.bool, device=mask.device)
    return (causal_mask(T, mask.device) & key_ok[:, None, None, :]) | eye


class DecisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # Each modality gets its own embedding; the timestep embedding is added to all three
        # tokens of a step and plays the role of the position embedding. It is an *absolute*
        # episode time, so a window's predictions do not depend on where it sits in the context,
        # which is what makes left padding harmless.
        self.embed_timestep = nn.Embedding(cfg.max_ep_len, cfg.n_embd)
        self.embed_return = nn.Linear(1, cfg.n_embd)
        self.embed_state = nn.Linear(cfg.state_dim, cfg.n_embd)
        self.embed_action = nn.Linear(cfg.act_dim, cfg.n_embd)
        self.embed_ln = nn.LayerNorm(cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.predict_action = nn.Linear(cfg.n_embd, cfg.act_dim)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream keeps its
        # variance from growing with depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, states, actions, returns_to_go, timesteps):
        B, K, _ = states.shape
        time = self.embed_timestep(timesteps.clamp(max=self.cfg.max_ep_len - 1))
        tokens = torch.stack(
            (self.embed_return(returns_to_go) + time,
             self.embed_state(states) + time,
             self.embed_action(actions) + time),
            dim=2,
        ).reshape(B, 3 * K, self.cfg.n_embd)  # interleave: R_1, s_1, a_1, R_2, ...
        return self.drop(self.embed_ln(tokens))

    def forward(self, states, actions, returns_to_go, timesteps, mask=None):
        """states (B,K,S), actions (B,K,A), returns_to_go (B,K,1), timesteps (B,K) long,
        mask (B,K) bool, True for real steps (None: all real). Returns actions (B,K,A) in [-1, 1]."""
        B, K, _ = states.shape
        x = self.embed(states, actions, returns_to_go, timesteps)
        attn_mask = None if mask is None else padded_causal_mask(mask)
        for block in self.blocks[:-1]:
            x = block(x, attn_mask)
        # Only the hidden states at the s_t tokens (index 1 of each triple) are read: they predict
        # a_t. So the last block computes its queries, projection and MLP for those K tokens
        # alone, a third of its tokens (keys and values still come from all 3K), which saves 17%
        # of a training step's FLOPs and computes the same function. Those queries need their
        # rows of the causal mask spelled out.
        state_tokens = slice(1, None, 3)
        full_mask = causal_mask(3 * K, states.device) if attn_mask is None else attn_mask
        x = self.blocks[-1](x, full_mask[..., state_tokens, :], queries=state_tokens)  # (B, K, C)
        # tanh keeps the action inside the [-1, 1] box that MuJoCo's actuators accept.
        return torch.tanh(self.predict_action(self.ln_f(x)))

    @torch.no_grad()
    def get_action(self, states, actions, returns_to_go, timesteps, mask=None):
        """Next action for a batch of episodes given their histories so far, each (B, T, ...),
        T >= 1, with a placeholder (zeros) for the not-yet-taken last action. Keeps the last K
        steps and left-pads shorter histories, exactly as the training windows were built. A
        caller that pads itself passes its (B, T) mask, True for real steps: rollout.py does, so
        that every call has the same shapes, which torch.compile and CUDA graphs need."""
        K = self.cfg.context_len
        states, actions = states[:, -K:], actions[:, -K:]
        returns_to_go, timesteps = returns_to_go[:, -K:], timesteps[:, -K:]
        B, T = states.shape[:2]
        mask = None if mask is None else mask[:, -K:]
        if T < K:
            pad = K - T
            states, actions, returns_to_go = (F.pad(x, (0, 0, pad, 0)) for x in (states, actions, returns_to_go))
            timesteps = F.pad(timesteps, (pad, 0))
            real = torch.ones(B, T, dtype=torch.bool, device=states.device) if mask is None else mask
            mask = F.pad(real, (pad, 0), value=False)
        # forward(...)[:, -1] computed with a third less work, which is most of an evaluation
        # step: only the last state token's output is wanted, so the placeholder action token
        # after it (which no earlier token sees) is dropped, and the last block runs its query,
        # projection and MLP for that one token.
        x = self.embed(states, actions, returns_to_go, timesteps)[:, :-1]
        attn_mask = None if mask is None else padded_causal_mask(mask)[:, :, :-1, :-1]
        for block in self.blocks[:-1]:
            x = block(x, attn_mask)
        # The last query may see every key, so causality needs no mask there; padding still does.
        last = slice(-1, None)
        x = self.blocks[-1](x, None if attn_mask is None else attn_mask[..., last, :], queries=last)
        return torch.tanh(self.predict_action(self.ln_f(x[:, -1])))


def action_loss(pred, target, mask):
    """Mean squared error of (B, K, A) predicted actions over real (unpadded) steps only."""
    m = mask[..., None].to(pred.dtype)
    return ((pred - target) ** 2 * m).sum() / (m.sum() * pred.shape[-1])


def configure_optimizer(model, lr, weight_decay, betas=(0.9, 0.999)):
    """AdamW with weight decay on matrices (linear weights, embeddings) only: decaying biases and
    LayerNorm gains pulls them toward zero for no regularisation benefit."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # Fused: one kernel updates every parameter, on a CPU as on a GPU (3.3x faster than the
    # per-tensor loop on one CPU core, and bit-identical to it in fp32).
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def get_lr(step, total_steps, max_lr):
    """Linear warm-up over the first 10% of steps, then cosine decay to max_lr / 10."""
    warmup = max(1, total_steps // 10)
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return max_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))
