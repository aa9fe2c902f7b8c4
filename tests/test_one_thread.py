"""The benchmarks' one launcher of timed runs: one torch thread, this checkout imported, the caller's paths kept,
failures named."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from benchmarks import one_thread

PROBE = ("import os, torch, benchmarks.one_thread as m; "
         "print(os.environ['OMP_NUM_THREADS'], torch.get_num_threads(), os.getcwd(), m.__file__, sep='|')")


def test_a_run_has_one_torch_thread_imports_this_checkout_and_keeps_the_callers_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # started from elsewhere than the repository root
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    done = one_thread.run_python(["-c", PROBE], "probe")
    omp, threads, cwd, module = done.stdout.strip().split("|")
    assert (omp, threads) == ("1", "1")
    assert Path(cwd) == tmp_path  # a relative --out means what it meant to the caller
    assert Path(module) == Path(one_thread.__file__)


def test_a_failed_run_is_named_with_its_own_error_and_exit_status():
    code = "import sys; sys.stderr.write('x' * 5000 + 'cannot read faces/07.png'); sys.exit(3)"
    with pytest.raises(RuntimeError) as err:
        one_thread.run_python(["-c", code], "half-crops seed 2")
    message = str(err.value)
    assert message.startswith("half-crops seed 2 failed (exit 3):")
    assert message.endswith("cannot read faces/07.png")
    assert len(message) < one_thread.ERROR_TAIL + 100  # the tail, not the whole log


def test_side_by_side_keeps_the_order_and_lets_a_run_under_way_end_before_a_failure_is_raised():
    ended = []

    def work(i: int) -> int:
        if i == 1:
            raise RuntimeError("run 1 failed")
        time.sleep(0.3)  # run 0 is under way when run 1 fails
        ended.append(i)
        return i

    assert one_thread.side_by_side(lambda i: i * 10, range(5), jobs=2) == [0, 10, 20, 30, 40]
    with pytest.raises(RuntimeError, match="run 1 failed"):
        one_thread.side_by_side(work, range(2), jobs=2)
    assert ended == [0]
