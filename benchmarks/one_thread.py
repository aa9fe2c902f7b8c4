"""Benchmark runs in processes of their own, one torch thread each, a few at once.

Every training benchmark times a run by its own process CPU time with one thread, so that two runs side by side on
a shared machine each get a core and neither's figure counts the other's work. This is the one place that starts
such a process: the thread limits are set in its environment before torch loads (torch reads them at import), the
repository root leads its import path (so `-m benchmarks...` and `-c` code import this checkout, from wherever it
was started; relative paths in its arguments keep meaning what they meant to the caller), and a failure raises with
the tail of the run's own error output, naming the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ERROR_TAIL = 3000  # characters of the run's stderr in the error

T = TypeVar("T")
R = TypeVar("R")


def one_thread_env() -> dict[str, str]:
    """This process's environment with the thread limits a timed run needs and this checkout first on the path."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, **ONE_THREAD, "PYTHONPATH": path}


def run_python(args: list[str], what: str, capture: bool = True) -> subprocess.CompletedProcess:
    """`python ARGS` (e.g. ["-m", "benchmarks.speed.timed_run", ...]) with one thread; prints its wall time when
    done. `capture=False` lets its output through (a long run's own progress)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, *args], env=one_thread_env(), capture_output=capture, text=True)
    if done.returncode != 0:
        tail = (done.stderr or "")[-ERROR_TAIL:] if capture else "(its output is above)"
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{tail}")
    print(f"  {what}: {time.perf_counter() - t0:.0f} s wall", flush=True)
    return done


def side_by_side(work: Callable[[T], R], items: Iterable[T], jobs: int) -> list[R]:
    """`work` on each item, `jobs` at once (each call starts its own process), results in the items' order. A
    failure is raised once the runs under way have ended (none is killed midway); the runs not yet started when it
    is seen are dropped (the studies rerun: what finished is kept)."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(work, items))
