"""The GPU suite's --smoke run: every check runs at toy sizes on the CPU and lands in both tables, which agree."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # `python -m benchmarks.gpu.suite` runs from the repository root
CHECKS = [str(n) for n in range(13)]  # 0 matmul rate ... 9, 10 speed to quality on MNIST, 11 flow bases, 12 caches


def test_smoke_run_writes_a_figure_or_a_named_skip_for_every_check_in_agreeing_tables(tmp_path):
    # The smoke budgets are process CPU seconds (a shared CPU slows the wall clock, not them): the suite's own
    # deadline keeps it under 3 minutes of CPU; the wall timeout is only a net for a hang.
    subprocess.run([sys.executable, "-m", "benchmarks.gpu.suite", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                   check=True, timeout=900)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["elapsed_s"] < 180
    markdown = (tmp_path / "results.md").read_text()
    rows = data["rows"]
    for number in CHECKS:
        mine = [r for r in rows if r["check"].split()[0] == number]
        assert mine, f"check {number} has no row"
        for r in mine:
            numeric = isinstance(r["figure"], (int, float)) and r["figure"] == r["figure"]  # not NaN
            assert numeric or re.match(r"(not available|skipped): \S", r["note"]), r
            assert not r["note"].startswith(("error", "timed out")), r
    table = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith(("| check", "| ---"))]
    assert len(table) == len(rows)
    for line, r in zip(table, rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == r["check"]
        assert cells[3] == {True: "yes", False: "NO", None: "-"}[r["met"]]
        if r["figure"] is not None:
            assert float(cells[1].split()[0]) == float(f"{r['figure']:.4g}")
