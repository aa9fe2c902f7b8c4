"""Loading never runs code: checkpoints and stores are safetensors, a tampered, truncated or pickled file is
refused with a clear message, and a manifest cannot point a read outside its store folder.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tiny_runs import make_tiny_run
from trainer_helpers import make_store, photo_crops

from latentpatch.checkpoints import latest_checkpoint
from latentpatch.cli.app import main

ROOT = Path(__file__).resolve().parents[1]
UNPICKLING = r"\bimport pickle\b|\bpickle\.load|\bdill\b|yaml\.load\(|allow_pickle=True|yaml\.unsafe"
SOURCES = sorted(p for d in ("latentpatch", "autoencoders", "cli") for p in (ROOT / d).rglob("*.py"))


def _run_main(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["latentpatch", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code or 0, capsys.readouterr().err


def _user_error(code: int, err: str, *parts: str) -> None:
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


class _Payload:
    """A pickle that creates a file when unpickled: proof that a loader ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_bomb(path: Path, marker: Path) -> None:
    torch.save({"weight": _Payload(marker)}, path)


# --- the code loads nothing with pickle -----------------------------------------------------------------


def test_no_loader_in_the_package_can_unpickle():
    found = []
    for path in SOURCES:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(UNPICKLING, code):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []


# --- checkpoints --------------------------------------------------------------------------------------


@pytest.fixture
def run(tmp_path) -> Path:
    return make_tiny_run(tmp_path / "run")


def _sample(monkeypatch, capsys, run: Path, out: Path) -> tuple[int, str]:
    return _run_main(monkeypatch, capsys, "sample", run, "--n", 1, "--out", out, "--steps", 2, "--device", "cpu",
                     "--no-progress")


@pytest.mark.parametrize("damage", ["truncate", "flip-bytes", "empty"])
def test_sample_refuses_a_damaged_checkpoint_with_a_clear_message(run, tmp_path, monkeypatch, capsys, damage):
    weights = latest_checkpoint(run) / "ema.safetensors"
    data = weights.read_bytes()
    changed = {"truncate": data[: len(data) // 2], "flip-bytes": data[:-4] + b"\1\2\3\4", "empty": b""}[damage]
    weights.write_bytes(changed)
    code, err = _sample(monkeypatch, capsys, run, tmp_path / "out")
    _user_error(code, err, str(weights), "truncated or changed")
    assert not list(tmp_path.glob("out/**/*.png"))  # refused before any image was made
    assert weights.read_bytes() == changed  # and the damaged file is left as it was, for the user to look at


def test_a_pickle_in_place_of_weights_is_refused_without_running_it(run, tmp_path, monkeypatch, capsys):
    # The attacker also rewrites state.json's sha256, so only the format check stands in the way.
    ckpt, marker = latest_checkpoint(run), tmp_path / "pwned"
    _pickle_bomb(ckpt / "ema.safetensors", marker)
    state = json.loads((ckpt / "state.json").read_text())
    state["files"]["ema.safetensors"] = hashlib.sha256((ckpt / "ema.safetensors").read_bytes()).hexdigest()
    (ckpt / "state.json").write_text(json.dumps(state))
    code, err = _sample(monkeypatch, capsys, run, tmp_path / "out")
    _user_error(code, err, str(ckpt / "ema.safetensors"), "not a readable safetensors file")
    assert not marker.exists()


def test_a_garbled_state_json_is_refused(run, tmp_path, monkeypatch, capsys):
    ckpt = latest_checkpoint(run)
    (ckpt / "state.json").write_text("{not json")
    code, err = _sample(monkeypatch, capsys, run, tmp_path / "out")
    _user_error(code, err)
    assert "state.json" in err or "no checkpoint" in err, err


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store"), photo_crops(8, 16), shard_size=4)


def _train(monkeypatch, capsys, store: Path, run: Path, *extra) -> tuple[int, str]:
    return _run_main(monkeypatch, capsys, "train", "--latents", store, "--out", run, "--device", "cpu",
                     "--no-progress", *extra)


def test_resume_refuses_a_tampered_checkpoint(store_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    code, err = _train(monkeypatch, capsys, store_dir, run, "--config", "tiny", "--max-steps", 2,
                       "train.ckpt_every=2", "optim.warmup_steps=1")
    assert code == 0, err
    optimizer = latest_checkpoint(run) / "optimizer.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:-100])
    code, err = _train(monkeypatch, capsys, store_dir, run, "--resume", "--max-steps", 4)
    _user_error(code, err, "optimizer.safetensors")
    assert latest_checkpoint(run).name == "step-00000002"


# --- stores -------------------------------------------------------------------------------------------


def _copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


OUTSIDE = ["../evil.safetensors", "ABS", "shards/../../evil.safetensors", "sub/shard-00000.safetensors"]


@pytest.mark.parametrize("shard", OUTSIDE)
def test_a_manifest_pointing_outside_its_folder_is_refused(store_dir, tmp_path, monkeypatch, capsys, shard):
    store = _copy_store(store_dir, tmp_path / "store")
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes((store / "shards" / "shard-00000.safetensors").read_bytes())
    shard = str(evil) if shard == "ABS" else shard
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shards"][0]["file"] = shard
    (store / "manifest.json").write_text(json.dumps(manifest))
    code, err = _train(monkeypatch, capsys, store, tmp_path / "run", "--config", "tiny", "--max-steps", 1)
    _user_error(code, err, str(store / "manifest.json"), repr(shard))


def test_a_pickle_in_place_of_a_shard_is_refused_without_running_it(store_dir, tmp_path, monkeypatch, capsys):
    store, marker = _copy_store(store_dir, tmp_path / "store"), tmp_path / "pwned"
    shard = store / "shards" / "shard-00000.safetensors"
    _pickle_bomb(shard, marker)
    code, err = _train(monkeypatch, capsys, store, tmp_path / "run", "--config", "tiny", "--max-steps", 1)
    _user_error(code, err, str(shard))
    assert not marker.exists()


def test_a_truncated_shard_is_refused(store_dir, tmp_path, monkeypatch, capsys):
    store = _copy_store(store_dir, tmp_path / "store")
    shard = store / "shards" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])
    code, err = _train(monkeypatch, capsys, store, tmp_path / "run", "--config", "tiny", "--max-steps", 1)
    _user_error(code, err, str(shard))
