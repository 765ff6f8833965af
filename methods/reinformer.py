"""
The max-return Decision Transformer, Reinformer (Zhuang et al., ICML 2024, arXiv:2405.08740):
`python train.py --model reinformer`, and `python evaluate.py ckpt.pt` with no target.

The DT imitates the return it is told: ask it for more than any one episode in the data earned and
it has never seen such a return-to-go. Reinformer keeps the DT's transformer but orders each step's
tokens state first, and teaches the return token to *predict* the return from the state:

    token:     s_1  R_1  a_1  s_2  R_2  a_2  ...  s_K  R_K  a_K
    predicts:  R̂_1  a_1       R̂_2  a_2            R̂_K  a_K

    what the s_2 token may see:  s_1 R_1 a_1 s_2          (not R_2, not a_2)
    what the R_2 token may see:  s_1 R_1 a_1 s_2 R_2      (not a_2)

R̂_t is fitted by expectile regression with a high expectile (0.99): errors where the data's return
is above the prediction cost 99 times as much as those below, so R̂(s) climbs to nearly the
largest return-to-go the data holds *from states like s*, whichever episode it came from. That is
where it can stitch: two episodes that pass the same cell teach one R̂ there, the larger of the
two. At test time no target is asked for: at every step the model predicts R̂_t from the state,
writes it into the return token, and reads the action off that token, an action conditioned on
the best return the data shows from here. The action head and its loss are the DT's (the paper
uses a Gaussian with an entropy bonus; the mean squared error keeps the comparison with the DT
about the return token alone).
"""
import torch
import torch.nn as nn

from common.acting import WindowPolicy, compiled
from model import DecisionTransformer, action_loss, padded_causal_mask

EXPECTILE = 0.99    # the paper's: R̂ near the top of the returns the data reaches from a state
RETURN_WEIGHT = 1.0  # the paper's: return loss + action loss, unweighted


class Reinformer(DecisionTransformer):
    """The DT's embeddings and blocks (model.py), its tokens in the order (s, R, a), and a second
    head that reads the predicted return off each state token."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.predict_return = nn.Linear(cfg.n_embd, 1)
        nn.init.normal_(self.predict_return.weight, std=0.02)
        nn.init.zeros_(self.predict_return.bias)

    def embed(self, states, actions, returns_to_go, timesteps):
        """The DT's tokens (R_t, s_t, a_t) put in this order, (s_t, R_t, a_t): its embeddings, layer
        norm and dropout act on each token alone, so reordering after them is the same."""
        tokens = super().embed(states, actions, returns_to_go, timesteps)
        B, T, C = tokens.shape
        return tokens.view(B, T // 3, 3, C)[:, :, [1, 0, 2]].reshape(B, T, C)

    def hidden(self, tokens, mask):
        """The last block's output for every token: (B, T, C), T <= 3K, the first T tokens of the
        windows whose (B, K) step mask is `mask` (None: all real)."""
        T = tokens.shape[1]
        attn_mask = None if mask is None else padded_causal_mask(mask)[:, :, :T, :T]
        for block in self.blocks:
            tokens = block(tokens, attn_mask)
        return self.ln_f(tokens)

    def forward(self, states, actions, returns_to_go, timesteps, mask=None):
        """Inputs as the DT's -> (predicted returns (B, K), actions (B, K, A) in [-1, 1]): R̂_t from
        the s_t token, a_t from the R_t token."""
        x = self.hidden(self.embed(states, actions, returns_to_go, timesteps), mask)
        return self.predict_return(x[:, 0::3]).squeeze(-1), torch.tanh(self.predict_action(x[:, 1::3]))

    # At test time a step is two passes over the window. The first stops at the new state's token
    # (the return and action tokens after it are not known yet, and no earlier token sees them) and
    # predicts R̂_t; the second, with R̂_t in its place, stops at the return token and gives a_t.

    @torch.no_grad()
    def get_return(self, states, actions, returns_to_go, timesteps, mask=None):
        """R̂ of the last step of (B, K) windows, (B,); its return and action are placeholders."""
        x = self.hidden(self.embed(states, actions, returns_to_go, timesteps)[:, :-2], mask)
        return self.predict_return(x[:, -1]).squeeze(-1)

    @torch.no_grad()
    def get_action(self, states, actions, returns_to_go, timesteps, mask=None):
        """a of the last step of (B, K) windows whose last return is R̂; its action a placeholder."""
        x = self.hidden(self.embed(states, actions, returns_to_go, timesteps)[:, :-1], mask)
        return torch.tanh(self.predict_action(x[:, -1]))


def return_loss(pred, target, mask, expectile):
    """Expectile regression of the predicted returns on the data's, over real steps:
    mean of |expectile - 1(u < 0)| u², u = (target - pred) / mean |target|. The paper divides by
    the batch's mean |return-to-go| (a constant to the gradient), so the loss has the same size
    whatever the returns' scale; a batch of zero returns (a maze's far cells) divides by 1."""
    real = mask.to(pred.dtype)
    scale = ((target.abs() * real).sum() / real.sum()).detach()
    u = (target - pred) / torch.where(scale > 0, scale, torch.ones_like(scale))
    weight = (expectile - (u < 0).to(u.dtype)).abs()
    return (weight * u ** 2 * real).sum() / real.sum()


class Objective(nn.Module):
    """Reinformer's training forward: a batch of the DT's windows in, action loss plus weighted
    return loss out, the matmuls under `amp`, the losses in fp32."""

    def __init__(self, model, amp, expectile, return_weight):
        super().__init__()
        self.model, self.amp = model, amp
        self.expectile, self.return_weight = expectile, return_weight

    def forward(self, states, actions, returns_to_go, timesteps, mask):
        with self.amp:
            pred_returns, pred_actions = self.model(states, actions, returns_to_go, timesteps, mask)
        return (action_loss(pred_actions.float(), actions, mask)
                + self.return_weight * return_loss(pred_returns.float(), returns_to_go[..., 0], mask, self.expectile))


class MaxReturnPolicy(WindowPolicy):
    """How Reinformer acts: no target; every step it predicts the return R̂ from the new state,
    writes it where the DT would have the return-to-go, and takes the action read off it."""

    def __init__(self, model, norm, target, episodes, device, *, compile=False, **settings):
        super().__init__(model, norm, target, episodes, device, compile=compile, **settings)
        self.predict_return = compiled(model.get_return, device) if compile else model.get_return

    def act(self, states, returns, t):
        window = self.advance(states, t)
        with self.amp:
            self.rtg[:, -1, 0] = self.predict_return(*window).float()
            action = self.policy(*window).float()
        self.actions[:, -1] = action
        return action

    def describe(self):
        return "max return, predicted"


def check(expectile, return_weight):
    """What is wrong with Reinformer's settings, or None."""
    if not (0 < expectile < 1 and return_weight >= 0):
        return "reinformer needs 0 < --expectile < 1 and --return-weight >= 0"
    return None
