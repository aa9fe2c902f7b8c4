"""The run's own training time: what a step costs the run itself, whatever else the machine is doing.

On the CPU it is the process's CPU seconds (time.process_time): another process on a shared machine slows the
wall clock, not this; with one torch thread it is the run's compute. On CUDA kernels run asynchronously, so a host
clock times their launch: each step is bracketed by CUDA events, read (a synchronisation) only when the time is
asked for. Held-out evaluation, previews, logging and checkpoints are outside the brackets. The total is kept in
every checkpoint, so a resumed run's clock continues where it stopped.
"""

from __future__ import annotations

import time

import torch


class TrainClock:
    """Seconds of optimisation steps: `start()` and `stop()` around each step, `seconds` the total so far."""

    def __init__(self, device: torch.device, seconds: float = 0.0) -> None:
        self.cuda = device.type == "cuda"
        self._total = float(seconds)
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            self._pending.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self._pending[-1][0].record()
        else:
            self._t0 = time.process_time()

    def stop(self) -> None:
        if self.cuda:
            self._pending[-1][1].record()
        else:
            self._total += time.process_time() - self._t0

    @property
    def seconds(self) -> float:
        """The total; on CUDA this waits for the steps bracketed so far (one synchronisation)."""
        if self._pending:
            self._pending[-1][1].synchronize()
            self._total += sum(a.elapsed_time(b) for a, b in self._pending) / 1000
            self._pending.clear()
        return self._total
