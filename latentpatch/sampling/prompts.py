"""Prompts files for batch generation: plain text (one prompt a line) or JSONL with "prompt" and "count"."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from latentpatch.errors import UserError


@dataclass(frozen=True)
class PromptEntry:
    """One prompt and how many images to make of it."""

    prompt: str
    count: int


def _is_jsonl(path: Path, lines: list[str]) -> bool:
    """A .jsonl/.json file, or one whose every non-blank line is a JSON object."""
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return True
    return all(line.lstrip().startswith("{") for line in lines if line.strip())


def _jsonl_entry(line: str, where: str, default_count: int) -> PromptEntry:
    try:
        row = json.loads(line)
    except ValueError as e:
        raise UserError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise UserError(f'{where} needs an object with a "prompt" string, e.g. {{"prompt": "a cat", "count": 4}}')
    unknown = sorted(set(row) - {"prompt", "count"})
    if unknown:
        raise UserError(f'{where} has unknown keys {unknown}; the keys are "prompt" and "count"')
    count = row.get("count", default_count)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise UserError(f'{where}: "count" must be a whole number >= 1, got {count!r}')
    if not row["prompt"].strip():
        raise UserError(f"{where} has an empty prompt")
    return PromptEntry(row["prompt"], count)


def read_prompts(path: str | os.PathLike, per_prompt: int) -> list[PromptEntry]:
    """The prompts of `path`, each with `per_prompt` images (or its own JSONL "count").

    Plain text: one prompt per line, blank lines skipped, surrounding whitespace stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"could not read prompts file {path}: {e}") from e
    lines = text.splitlines()
    if _is_jsonl(path, lines):
        entries = [
            _jsonl_entry(line, f"{path} line {k}", per_prompt)
            for k, line in enumerate(lines, start=1) if line.strip()
        ]
    else:
        entries = [PromptEntry(line.strip(), per_prompt) for line in lines if line.strip()]
    if not entries:
        raise UserError(f"prompts file {path} holds no prompts (it is empty or only blank lines)")
    return entries
