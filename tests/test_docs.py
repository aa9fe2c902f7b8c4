"""The documentation names every config key and preset there is, so it cannot drift from the code."""

import dataclasses
from pathlib import Path

from latentpatch.config import RunConfig, builtin_config_names

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_configuration_md_documents_every_config_key_and_preset():
    text = (DOCS / "configuration.md").read_text()
    missing = [k for k in _keys(RunConfig()) if f"`{k}`" not in text]
    assert not missing, f"docs/configuration.md lacks {missing}"
    assert not [p for p in builtin_config_names() if f"`{p}`" not in text]


def test_configuration_md_lists_each_removed_key_with_its_evidence_and_no_longer_as_a_key():
    from latentpatch.config import REMOVED_KEYS

    text = (DOCS / "configuration.md").read_text()
    live, removed = text.split("## Removed keys")
    for key in REMOVED_KEYS:
        assert f"| `{key}` (" in removed, key  # a row: the key, its old default, what it did, the evidence
        assert f"| `{key}` |" not in live, key  # no longer in the tables of keys a config takes
