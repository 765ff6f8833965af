"""
Whole training steps recorded once as a CUDA graph and replayed: train.py --graph-steps K.

A training step of these small models is hundreds of small kernels, and on a GPU the host's time
to launch them, not the arithmetic, sets the pace. torch.compile's "reduce-overhead" mode records
the forward and backward as graphs; here everything a step does on the device is recorded, K
steps in a row: the learning rate of the schedule, drawing the batch from the on-device dataset,
forward, backward, gradient clipping, the fused optimizer update (and IQL's target networks). One
launch then runs K steps, and the host reads nothing until the loop's next log point.

What makes the replayed steps the steps the eager loop would take:
- the learning rate is a device tensor the optimizer reads, looked up in a table of the schedule
  by a device step counter: a Python float would be frozen into the graph as a constant;
- the sampler's generator is registered with the graph, so every replay draws new batches, and the
  generator's state afterwards is the one the same steps run eagerly would leave (exact --resume;
  dropout's default CUDA generator is handled by torch the same way);
- the optimizer is capturable: its step counts live on the device.
On a CPU there is no graph to record: the same steps run eagerly, K at a time, which is what the
tests compare, to the last bit, with train.py's plain loop.
"""
import torch

WARMUP_RUNS = 3  # eager runs before recording: compiling, cuBLAS workspaces, the optimizer's state


class GraphedSteps:
    """run(step, n): training steps step .. step + n - 1 on the device; returns their losses, (n,).
    A run of exactly K steps (the loop's usual one) is a graph replay once recorded; shorter runs
    (up to a log point that K does not divide, the last steps) run the same steps eagerly."""

    def __init__(self, k, step_fn, sample, lr_of, total_steps, optimizer, generator, device):
        self.k, self.step_fn, self.sample, self.generator = k, step_fn, sample, generator
        self.cuda = device.startswith("cuda")
        # CUDA's fused AdamW reads a float32 learning rate; the CPU's reads a double, as the plain
        # loop's Python float, so that the CPU's steps are the plain loop's to the last bit.
        dtype = torch.float32 if self.cuda else torch.float64
        self.lrs = torch.tensor([lr_of(s) for s in range(total_steps)], dtype=dtype, device=device)
        self.lr = torch.zeros((), dtype=dtype, device=device)
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.losses = torch.zeros(k, device=device)
        for group in optimizer.param_groups:
            if group.get("schedule") != "constant":  # IQL's critics keep their float --lr
                group["lr"] = self.lr
            group["capturable"] = self.cuda
        self.graph, self.eager_runs = None, 0

    def steps(self, n):
        for i in range(n):
            self.lr.copy_(self.lrs.index_select(0, self.step).squeeze(0))
            self.losses[i] = self.step_fn(self.sample())
            self.step += 1

    def run(self, step, n):
        self.step.fill_(step)
        if self.graph is not None and n == self.k:
            self.graph.replay()
        elif self.cuda:
            # Before recording, CUDA wants the steps run on a side stream (torch.cuda.graphs' own
            # advice); the eager runs are real steps, not thrown away.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.steps(n)
            torch.cuda.current_stream().wait_stream(side)
            self.eager_runs += n == self.k
            if self.graph is None and self.eager_runs >= WARMUP_RUNS:
                self.record()
        else:
            self.steps(n)
        return self.losses[:n].clone()

    def record(self):
        """Record K steps. Recording runs nothing: the model, optimizer and generators are as they
        were, and the next full run replays what was recorded."""
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)
        with torch.cuda.graph(graph):
            self.steps(self.k)
        self.graph = graph
