"""Every GPU figure in one prepared command: each check of benchmarks/gpu/checks beside its aim.

    python -m benchmarks.gpu.suite --out DIR            # on one H200, at most --deadline seconds (480)
    python -m benchmarks.gpu.suite --smoke --out DIR    # on the CPU at toy sizes, in under 3 minutes

Writes DIR/results.json and DIR/results.md (check, figure, aim, met?) after every check, so a kill still leaves
what was measured. Each check runs under its own time budget (an alarm ends it) and its own try/except: a
failure or an overrun is a row that says so, and the checks after it still run. A check whose budget no longer
fits before the deadline is skipped with that reason. On the GPU budgets and deadline are wall seconds; with
--smoke they are this process's CPU seconds (one torch thread), so that other jobs on a shared CPU slow the
smoke run without cutting its checks short. On the device: benchmarks/gpu/suite.sh.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .checks import attention_check, encode_check, pretrained_check, sample_check, speed_check, speed_mnist_check
from .checks import caching_check, flow_check, trainer_check
from .checks.common import GPU, SMOKE, Context, Row, free_memory
from .tables import write_tables


@dataclass
class Check:
    name: str
    rows: list[str]  # the row names it writes (an error or a skip writes one row for each)
    budget: float  # seconds on the GPU
    smoke_budget: float
    run: Callable[[Context], list[Row]]
    optional: bool = False  # skipped unless --stq


CHECKS = [
    Check("matmul", ["0 matmul rate"], 20, 10, trainer_check.run_matmul),
    Check("trainer DiT-B/2", ["1 trainer/plain step, full", "1 trainer/plain step, half",
                              "2 DiT-B/2 training, share of matmul rate", "2 schedule images/s vs full-size steps",
                              "3 compiled graphs per stage", "3 recompiles after warm-up"], 170, 40, trainer_check.run_b),
    Check("sample", ["5 sample/plain Heun"], 45, 15, sample_check.run),
    Check("pretrained", ["7 pretrained x0 vs diffusers, fp32", "7 pretrained x0 vs diffusers, bf16"], 45, 20,
          pretrained_check.run),
    Check("attention", ["6 xformers/SDPA step, DiT", "6 xformers/SDPA step, UNet"], 30, 15, attention_check.run),
    Check("encode", ["4 encode/plain vae.encode"], 60, 20, encode_check.run),
    Check("trainer DiT-XL/2", ["2 DiT-XL/2 training, share of matmul rate"], 100, 20, trainer_check.run_xl),
    Check("flow bases", [f"11 {m} half-crop/full step, {s} latents" for m in ("sd3-medium", "flux")
                         for s in ("smaller", "larger")],
          60, 15, flow_check.run),
    Check("sampling caches", caching_check.ROWS, 60, 15, caching_check.run),
    Check("speed to quality mnist5k-128", ["9 speed to quality, mnist5k-128: time to full-size's best, full/patch"],
          170, 40, speed_mnist_check.run, optional=True),
    Check("speed to quality mnist5k-256", ["10 speed to quality, mnist5k-256: time to full-size's best, full/patch"],
          300, 40, speed_mnist_check.run_64, optional=True),
    Check("speed to quality", ["8 speed to quality"], 110, 30, speed_check.run, optional=True),
]


class CheckTimeout(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` inside a check swallows it."""


def _alarm(signum, frame):
    raise CheckTimeout()


def failed_rows(check: Check, why: str) -> list[Row]:
    return [Row(name, None, "", "", None, why) for name in check.rows]


@dataclass(frozen=True)
class Budgets:
    """What the budgets count: wall seconds on the GPU, process CPU seconds with --smoke (a shared CPU)."""

    clock: Callable[[], float]
    timer: int  # the interval timer that raises CheckTimeout
    signal: int

    @classmethod
    def of(cls, smoke: bool) -> Budgets:
        if smoke:
            return cls(time.process_time, signal.ITIMER_PROF, signal.SIGPROF)
        return cls(time.perf_counter, signal.ITIMER_REAL, signal.SIGALRM)


def run_check(check: Check, ctx: Context, budget: float, budgets: Budgets) -> list[Row]:
    signal.signal(budgets.signal, _alarm)
    signal.setitimer(budgets.timer, budget)
    start = time.perf_counter()
    try:
        return check.run(ctx)
    except CheckTimeout:
        return failed_rows(check, f"timed out: over its budget of {budget:.0f} s")
    except Exception as e:  # noqa: BLE001 (one check's failure is a row; the others still run)
        traceback.print_exc()
        return failed_rows(check, f"error: {type(e).__name__}: {' '.join(str(e).split())[:240]}")
    finally:
        signal.setitimer(budgets.timer, 0)
        print(f"[{check.name}] {time.perf_counter() - start:.1f} s", flush=True)
        try:
            free_memory()
        except Exception:  # noqa: BLE001
            pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="every check at toy sizes on the CPU")
    ap.add_argument("--deadline", type=float, default=None, help="seconds for the whole suite (480 wall; smoke 170 CPU)")
    ap.add_argument("--stq", action=argparse.BooleanOptionalAction, default=True,
                    help="run check 8 (speed to quality) when its budget still fits")
    ap.add_argument("--only", default=None, help="comma-separated check names to run (default: all)")
    ap.add_argument("--stq-seconds", type=float, default=None, help="training seconds per arm of checks 8, 9 and 10")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    budgets = Budgets.of(args.smoke)
    start, wall_start = budgets.clock(), time.perf_counter()
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        torch.set_num_threads(1)  # a shared CPU: with two, OpenMP's spinning threads stall on the other's load
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the GPU machine, or pass --smoke")
    deadline = args.deadline or (170.0 if args.smoke else 480.0)
    sizes = SMOKE if args.smoke else GPU
    if args.stq_seconds is not None:
        sizes = replace(sizes, stq_seconds=args.stq_seconds, mnist_seconds=args.stq_seconds)
    ctx = Context(device, sizes, args.smoke)
    header = {"mode": "smoke (CPU, toy sizes; budgets in process CPU seconds)" if args.smoke else "GPU",
              "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or "cpu", "deadline_s": deadline, "elapsed_s": 0.0, "wall_s": 0.0}
    only = set(args.only.split(",")) if args.only else None
    rows: list[Row] = []
    for check in CHECKS:
        left = deadline - (budgets.clock() - start)
        budget = check.smoke_budget if args.smoke else check.budget
        if only is not None and check.name not in only:
            rows += failed_rows(check, "skipped: not in --only")
        elif check.optional and not args.stq:
            rows += failed_rows(check, "skipped: --no-stq")
        elif left < budget and (check.optional or left < 0.25 * budget):
            rows += failed_rows(check, f"skipped: {left:.0f} s left before the deadline, its budget is {budget:.0f} s")
        else:
            rows += run_check(check, ctx, min(budget, left), budgets)
        header["elapsed_s"] = budgets.clock() - start
        header["wall_s"] = time.perf_counter() - wall_start
        write_tables(args.out, header, rows)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
