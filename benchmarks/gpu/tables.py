"""The suite's two tables, results.json and results.md (check, figure, aim, met?), written whole after every
check and renamed into place, so a kill still leaves what was measured."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checks.common import Row


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_tables(out: Path, header: dict, rows: list[Row]) -> None:
    """results.json and results.md, each written whole and renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: int(r.check.split()[0]))  # by check number; stable within a check
    data = {**header, "rows": [r.to_dict() for r in rows]}
    lines = [f"# GPU suite: {header['device_name']}", "",
             f"{header['mode']}; torch {header['torch']}; {header['elapsed_s']:.0f} s of {header['deadline_s']:.0f} "
             f"({header.get('wall_s', header['elapsed_s']):.0f} wall s)",
             "", "| check | figure | aim | met? | note |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        met = {True: "yes", False: "NO", None: "-"}[r.met]
        figure = f"{fmt(r.figure)} {r.unit}".strip() if r.figure is not None else "-"
        lines.append(f"| {r.check} | {figure} | {r.aim or '-'} | {met} | {r.note.replace('|', '/')} |")
    for name, text in (("results.json", json.dumps(data, indent=1)), ("results.md", "\n".join(lines) + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
