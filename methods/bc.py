"""
Behaviour cloning, the baseline the DT paper compares against (`python train.py --model bc`; with
`--top-pct 10`, "10% BC": behaviour cloning on the best tenth of the episodes).
"""
import torch
import torch.nn as nn


class BehaviourCloning(nn.Module):
    """The baseline the DT paper compares against: an MLP from the current state to the action,
    with no return-to-go and no history (n_layer hidden layers of width n_embd). It takes the same
    inputs as the DT and predicts every step of a window on its own, so both train on the same
    batches, loss and schedule, and evaluate.py rolls both out alike."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        layers, width = [], cfg.state_dim
        for _ in range(cfg.n_layer):
            layers += [nn.Linear(width, cfg.n_embd), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = cfg.n_embd
        self.net = nn.Sequential(*layers, nn.Linear(width, cfg.act_dim))

    def forward(self, states, actions, returns_to_go, timesteps, mask=None):
        return torch.tanh(self.net(states))

    @torch.no_grad()
    def get_action(self, states, actions, returns_to_go, timesteps, mask=None):
        return self(states[:, -1], None, None, None)  # the last step is always a real one
