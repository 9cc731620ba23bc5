"""What the loop measures, without a host sync per step: phase times and the running loss/accuracy window.

On a GPU a host read (`.item()`, `bool(t)`, `synchronize`) stalls the CPU until the queued kernels finish,
so the next step's launches stop overlapping this step's work. Hence:
  PhaseTimer  on a GPU, each phase boundary records a CUDA event (no sync); the events are resolved, with
              one synchronize, by `take()` on log steps. On the CPU, perf_counter (CPU ops are synchronous).
  Window      per-micro-batch loss/accuracy sums stay on the device; `agree()` (log and checkpoint steps
              only) all-reduces them with every rank's stop request in one collective: the one host read.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

PHASES = ("data", "forward", "backward", "retraction", "optimizer", "checkpoint")


class PhaseTimer:
    """Seconds per phase of the step, accumulated between `take()` calls."""

    def __init__(self, device: str | torch.device):
        self.cuda = str(device).startswith("cuda")
        self.totals: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def phase(self, name: str):
        if self.cuda:  # GPU time between the two points of the stream: kernels, not their launch
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.totals[name] += time.perf_counter() - t0

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last call (resolves the CUDA events: call it on log steps only)."""
        if self.events:
            self.events[-1][2].synchronize()
            for name, start, end in self.events:
                self.totals[name] += start.elapsed_time(end) / 1e3
            self.events.clear()
        out = {p: self.totals.get(p, 0.0) for p in PHASES}
        self.totals.clear()
        return out


@dataclass(frozen=True)
class Agreement:
    """The window's totals over all ranks and whether any rank asked to stop: the same on every rank."""

    loss_sum: float
    correct: float
    seen: float
    stop: bool


class Window:
    """Running sums (loss * n, correct) since the last log step, kept on the device."""

    def __init__(self, device: str | torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.seen = 0  # samples, counted on the host (a shape, not a value: no sync)
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.sums += torch.stack([loss.detach().double() * labels.numel(),
                                  (logits.argmax(1) == labels).sum().double()])
        self.seen += labels.numel()

    def agree(self, stop: bool) -> Agreement:
        """One all-reduce (on the device: NCCL reduces only GPU tensors) of the sums and the stop requests."""
        local = torch.tensor([float(self.seen), float(stop)], dtype=torch.float64, device=self.device)
        buf = torch.cat([self.sums, local])
        dist.all_reduce(buf)
        loss_sum, correct, seen, stops = buf.tolist()
        return Agreement(loss_sum, correct, seen, stops > 0)

    def seconds(self) -> float:
        return time.perf_counter() - self.t0
