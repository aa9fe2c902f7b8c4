"""Which network calls of a batch run in full: one rule for every cache method, so `interval` and `warmup` mean
the same thing in each. It is the rule of diffusers' TaylorSeer hook (diffusers/hooks/taylorseer_cache.py,
`_measure_should_compute`), which the step cache uses as it is."""

from __future__ import annotations


def is_full(call: int, warmup: int, interval: int) -> bool:
    """Call `call` (0-based, counted from the batch's first) runs the whole network: the first `warmup` calls,
    then one in `interval` (calls warmup + 1, warmup + 1 + interval, ...). interval 1: every call."""
    return call < warmup or (call - warmup - 1) % interval == 0


class CallCounter:
    """Counts a batch's network calls and says whether the current one is full; reset before each batch."""

    def __init__(self, warmup: int, interval: int) -> None:
        self.warmup, self.interval = warmup, interval
        self.call = -1

    def advance(self) -> bool:
        """Count one more call; True when it runs in full."""
        self.call += 1
        return is_full(self.call, self.warmup, self.interval)

    def reset(self) -> None:
        self.call = -1
