"""
How a model acts in a rollout (rollout.py): a policy object per group of episodes, made by the
model kind's entry in checkpoint.MODEL_KINDS as policy(model, norm, target, episodes, device,
compile=, bf16=, planning=) (target None for a model that asks for none), then asked every step
act(states, returns so far, t) -> actions, told observe(rewards) after it. The DT's is below: BC
and IQL, which read only the last state, use it too; Reinformer's (methods/reinformer.py)
predicts its own target, the TT's (methods/plan.py) plans.
"""
import torch


def compiled(forward, device):
    """torch.compile of one step's forward: its shapes never change (the window is fixed, padding
    is masked), so it is captured once and, on CUDA, replayed as a CUDA graph every step."""
    return torch.compile(forward, mode="reduce-overhead" if device.type == "cuda" else None)


class WindowPolicy:
    """How the DT (and BC and IQL, which read only the last state) act: each episode's last K
    steps, shifted one step left every step and left-padded (mask False) until K steps have
    passed, so the policy is called with the same shapes every time; the return-to-go counts down
    from the target (with no target, for BC and IQL, it stays zero: their models never read it)."""

    def __init__(self, model, norm, target, episodes, device, *, compile=False, bf16=False, planning=None):
        self.norm, self.target, self.device = norm, target, device
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        self.model = model
        self.policy = compiled(model.get_action, device) if compile else model.get_action
        K, S, A = model.cfg.context_len, model.cfg.state_dim, model.cfg.act_dim
        self.states = torch.zeros(episodes, K, S, device=device)
        self.actions = torch.zeros(episodes, K, A, device=device)  # zeros: the not-yet-taken action
        self.rtg = torch.zeros(episodes, K, 1, device=device)
        self.real = torch.zeros(episodes, K, dtype=torch.bool, device=device)

    def act(self, states, returns, t):
        """(E, S) normalized states, each episode's return so far, the step -> (E, A) actions."""
        window = self.advance(states, t)
        if self.target is not None:
            self.rtg[:, -1, 0] = torch.as_tensor(self.norm.return_to_go(self.target, returns), dtype=torch.float32)
        with self.amp:
            action = self.policy(*window).float()
        self.actions[:, -1] = action
        return action

    def advance(self, states, t):
        """Shift the windows one step and put the new states in: -> the model's inputs (states,
        actions, returns-to-go, timesteps, mask), the last action and return-to-go still zeros."""
        K = self.states.shape[1]
        if t > 0:
            for window in (self.states, self.actions, self.rtg, self.real):
                window.copy_(window.roll(-1, dims=1))
            self.actions[:, -1] = 0.0
            self.rtg[:, -1] = 0.0
        self.states[:, -1] = states
        self.real[:, -1] = True
        # Absolute episode times of the window's steps; padded steps get 0, as in training.
        timesteps = torch.arange(t - K + 1, t + 1, device=self.device).clamp(min=0).expand(len(states), K)
        return self.states, self.actions, self.rtg, timesteps, self.real if t < K - 1 else None

    def observe(self, rewards):
        """The window holds returns-to-go, not rewards: nothing to add."""

    def describe(self):
        return "the state alone" if self.target is None else f"target {self.target:g}"
