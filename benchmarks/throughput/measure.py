"""How a step is timed and counted: a clock that a shared CPU's load does not move, the matmul rate every
utilisation figure is a share of, and a step's FLOPs."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode


class Clock:
    """Process CPU time on the CPU (a shared machine's load does not count); synchronised wall time on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.process_time()


def matmul_peak(device: torch.device, clock: Clock) -> float:
    """FLOP/s of a large square matmul in the dtype training's matmuls use (fp32 CPU, bf16 CUDA)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1536, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, start = 0, clock()
    while clock() - start < 3.0:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (clock() - start)


def step_flops(loss_fn) -> float:
    with FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    return float(counter.get_total_flops())
