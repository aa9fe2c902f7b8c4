"""Faults a long job meets on a shared machine: SIGKILL at random points of encode, train and sample, and a
disk that fills mid-write. Every stage must end complete and correct after a rerun, and never leave a
half-written store, checkpoint or image behind.

The kill time of each run is drawn from its seed: a random delay after the first durable result (a shard,
a checkpoint, an image), so kills land anywhere in the working phase, inside writes too. Seed 0 runs by
default; the other seeds are marked slow (`pytest -m slow tests/test_faults.py`).
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import make_tiny_run
from helpers import make_image_folder, run_main, verify_store
from PIL import Image
from safetensors.torch import load_file
from trainer_helpers import make_store, photo_crops, tiny_overrides

import latentpatch.checkpoints as ckpt_module
import latentpatch.io as lp_io
from latentpatch.sampling import job_folder
from latentpatch.checkpoints import latest_checkpoint
from latentpatch.config import load_config
from latentpatch.data.store import LatentStore
from latentpatch.sampling.generate import sample
from latentpatch.runs import load_run
from latentpatch.training.trainer import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
SEEDS = [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow),
         pytest.param(3, marks=pytest.mark.slow)]
TRAIN_OVER = tiny_overrides(**{"train.max_steps": 30, "train.ckpt_every": 5, "train.log_every": 5})
N_IMAGES, SAMPLE_ARGS = 10, dict(steps=12, batch_size=1, seed=5, device="cpu")


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "latentpatch.cli", *map(str, args)]


def _slow_cli(pause: float, *args) -> list[str]:
    """The CLI with a pause after each encoded batch (tests/slow_cli.py), so a kill lands mid-run."""
    return [sys.executable, str(Path(__file__).with_name("slow_cli.py")), str(pause), *map(str, args)]


def _kill_after(proc: subprocess.Popen, started, seed: int, spread: float, what: str) -> bool:
    """Wait for `started()`, then SIGKILL after a delay drawn from `seed`; True if the kill landed mid-run."""
    deadline = time.monotonic() + 300
    while not started() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None or started(), f"{what} ended before its first result: {proc.stderr.read()[-2000:]}"
    time.sleep(random.Random(seed).uniform(0.0, spread))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode == -signal.SIGKILL


def _no_temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]


# --- kill -9 and restart ------------------------------------------------------------------------------


def _stored(out: Path) -> int:
    try:
        return json.loads((out / "manifest.json").read_text())["count"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("seed", SEEDS)
def test_encode_killed_at_a_random_point_resumes_to_a_store_with_every_image_once(tmp_path, seed, monkeypatch,
                                                                                    capsys):
    src, out = tmp_path / "images", tmp_path / "store"
    make_image_folder(src, n=N_IMAGES, size=[32, (40, 32)], modes=("RGB", "L"))
    args = ["encode", src, "--vae", "pixel", "--resolution", 32, "--out", out, "--batch-size", 1,
            "--shard-size", 2, "--workers", 0, "--no-progress"]
    proc = subprocess.Popen(_slow_cli(0.15, *args), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _kill_after(proc, lambda: _stored(out) >= 1, seed, 1.5, "encode")
    before = _stored(out)

    code, stdout, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert f"already present: {before}" in stdout or f"store is up to date: {N_IMAGES}" in stdout
    store = LatentStore(out)
    verify_store(store)
    files = [i.file for i in store.items]
    assert sorted(files) == sorted(p.name for p in src.iterdir()) and len(set(files)) == N_IMAGES
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(s.file for s in store.manifest.shards)
    assert not _no_temp_files(out)
    # The pixel autoencoder is the identity: each stored row is its own image, whatever run wrote it.
    fresh = tmp_path / "fresh"
    assert run_main(monkeypatch, capsys, *args[:7], fresh, *args[8:])[0] == 0
    a, b = store.load()["mean"], LatentStore(fresh).load()["mean"]
    order_a = np.argsort(files)
    order_b = np.argsort([i.file for i in LatentStore(fresh).items])
    assert torch.equal(a[torch.from_numpy(order_a)], b[torch.from_numpy(order_b)])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store"), photo_crops(32, 16))


@pytest.fixture(scope="module")
def whole_run(store, tmp_path_factory):
    """The uninterrupted run every resumed one must equal, bit for bit."""
    run = tmp_path_factory.mktemp("whole") / "run"
    train(load_config("tiny", TRAIN_OVER), store, run, progress=False, device="cpu")
    return run


def _same_weights(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


@pytest.mark.parametrize("seed", SEEDS)
def test_train_killed_at_a_random_point_resumes_to_the_uninterrupted_weights(store, whole_run, tmp_path, seed):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli("train", "--latents", store, "--config", "tiny", "--out", run, "--device", "cpu",
                                 "--no-progress", *TRAIN_OVER), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _kill_after(proc, lambda: latest_checkpoint(run) is not None, seed, 2.0, "train")
    load_run(run)  # whatever the kill interrupted, the latest checkpoint loads and matches its sha256

    result = train(None, store, run, resume=True, progress=False, device="cpu")
    assert result.step == 30 and latest_checkpoint(run).name == "step-00000030"
    _same_weights(latest_checkpoint(whole_run), latest_checkpoint(run))
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 31, 5))
    assert not _no_temp_files(run)


def test_a_resume_removes_what_a_killed_write_left_even_with_nothing_to_train(store, whole_run, tmp_path):
    """A kill inside an atomic write (the loss plot, LATEST) leaves `.NAME.XXXX.tmp`; taking the run's lock
    clears them, also when the run is already at max_steps (the kill came after the last checkpoint), and leaves
    those of a folder another stage locks."""
    run = tmp_path / "run"
    shutil.copytree(whole_run, run)
    leftovers = [run / ".loss.png.2tl2mkbd.tmp", run / "checkpoints" / ".LATEST.a1b2c3.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
    # A sample job written into the run folder is another stage's folder (its own lock file): its temporary may be
    # a live write, and is that job's to clean.
    job = run / "samples"
    job.mkdir()
    (job / job_folder.LOCK_FILE).write_bytes(b"")
    (job / ".00000001.png.x7y8z9.tmp").write_bytes(b"writing")
    with pytest.warns(UserWarning, match="nothing to train"):
        result = train(None, store, run, resume=True, progress=False, device="cpu")
    assert result.step == 30 and _no_temp_files(run) == [str(job / ".00000001.png.x7y8z9.tmp")]
    _same_weights(latest_checkpoint(whole_run), latest_checkpoint(run))


@pytest.fixture(scope="module")
def tiny_run_module(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def expected_images(tiny_run_module):
    images = sample(tiny_run_module, n=N_IMAGES, output="tensor", **SAMPLE_ARGS)
    return job_folder.to_uint8(images * 2 - 1)


def _pixels(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def _check_job(out: Path, expected: torch.Tensor) -> None:
    names = sorted(p.name for p in out.glob("0*.png"))
    assert names == [f"{i:08d}.png" for i in range(N_IMAGES)]
    index = [json.loads(line)["index"] for line in (out / "images.jsonl").read_text().splitlines()]
    assert index == list(range(N_IMAGES))
    for i, name in enumerate(names):
        assert torch.equal(_pixels(out / name), expected[i]), name
    assert not _no_temp_files(out)


@pytest.mark.parametrize("seed", SEEDS)
def test_sample_killed_at_a_random_point_writes_every_image_once_and_whole(tiny_run_module, expected_images,
                                                                           tmp_path, seed):
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli("sample", tiny_run_module, "--n", N_IMAGES, "--out", out, "--steps", 12,
                                 "--batch-size", 1, "--seed", 5, "--device", "cpu", "--no-progress"),
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _kill_after(proc, lambda: any(out.glob("0*.png")), seed, 0.6, "sample")
    survivors = {p.name: p.stat().st_ino for p in out.glob("0*.png")}
    for name in survivors:  # every image on disk is whole, even one written as the kill landed
        with Image.open(out / name) as im:
            im.verify()

    result = sample(tiny_run_module, n=N_IMAGES, out=out, output="none", **SAMPLE_ARGS)
    assert result.skipped == len(survivors) and result.written == N_IMAGES - len(survivors)
    assert all((out / n).stat().st_ino == ino for n, ino in survivors.items())  # none written twice
    _check_job(out, expected_images)


# --- a disk that fills mid-write ----------------------------------------------------------------------


class FullDisk:
    """Files that accept `budget` bytes in all, then fail like a full disk (ENOSPC) after a partial write."""

    def __init__(self, budget: int):
        self.left, self.failures = budget, 0

    def wrap(self, f):
        disk = self

        class _File:
            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                f.__enter__()
                return self

            def __exit__(self, *exc):
                return f.__exit__(*exc)

            def write(self, data):
                if len(data) > disk.left:
                    f.write(bytes(data[: max(disk.left, 0)]))
                    disk.left, disk.failures = 0, disk.failures + 1
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                disk.left -= len(data)
                return f.write(data)

        return _File()

    def install(self, monkeypatch) -> FullDisk:
        """Route every atomic write (latentpatch.io) and every checkpoint file write through this disk."""

        class _Os:
            def __getattr__(self, name):
                return getattr(os, name)

            def fdopen(_, *a, **k):
                return self.wrap(os.fdopen(*a, **k))

        monkeypatch.setattr(lp_io, "os", _Os())
        monkeypatch.setattr(ckpt_module, "open", lambda *a, **k: self.wrap(builtins.open(*a, **k)), raising=False)
        return self


def _assert_disk_full_message(code: int, err: str) -> None:
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("error: could not write ") and "No space left on device" in err, err
    assert "nothing was left half-written" in err, err


def test_encode_on_a_full_disk_keeps_the_store_loadable_and_a_rerun_completes(tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "images", tmp_path / "store"
    make_image_folder(src, n=4, size=32, formats=("png",))
    args = ["encode", src, "--vae", "pixel", "--resolution", 32, "--out", out, "--batch-size", 1,
            "--shard-size", 2, "--workers", 0, "--no-progress"]
    assert run_main(monkeypatch, capsys, *args)[0] == 0
    make_image_folder(src, n=6, size=32, formats=("png",), start=4)
    with monkeypatch.context() as m:
        disk = FullDisk(30_000).install(m)  # room for about one more shard of 2 x 3 x 32 x 32 floats
        code, _, err = run_main(m, capsys, *args)
    _assert_disk_full_message(code, err)
    assert disk.failures >= 1
    store = LatentStore(out)
    verify_store(store)
    assert 4 <= len(store) < 10 and len(store.load()["mean"]) == len(store)
    assert not _no_temp_files(out)

    code, stdout, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    store = LatentStore(out)
    verify_store(store)
    assert sorted(i.file for i in store.items) == sorted(p.name for p in src.iterdir())


def test_train_on_a_full_disk_keeps_the_last_checkpoint_and_a_rerun_matches(store, whole_run, tmp_path,
                                                                            monkeypatch, capsys):
    run = tmp_path / "run"
    over = [o for o in TRAIN_OVER if not o.startswith("train.max_steps")]
    assert run_main(monkeypatch, capsys, "train", "--latents", store, "--config", "tiny", "--out", run,
                    "--device", "cpu", "--no-progress", "--max-steps", 10, *over)[0] == 0
    with monkeypatch.context() as m:
        disk = FullDisk(20_000).install(m)  # config, run.json and a log rewrite fit; a checkpoint does not
        code, _, err = run_main(m, capsys, "train", "--latents", store, "--out", run, "--resume",
                                "--device", "cpu", "--no-progress", "--max-steps", 30)
    _assert_disk_full_message(code, err)
    assert "could not write checkpoint" in err and disk.failures >= 1  # the loss plot failed too, quietly
    assert latest_checkpoint(run).name == "step-00000010"
    assert load_run(run).step == 10
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["LATEST", "step-00000005", "step-00000010"]
    assert not _no_temp_files(run)

    code, stdout, err = run_main(monkeypatch, capsys, "train", "--latents", store, "--out", run, "--resume",
                                 "--device", "cpu", "--no-progress", "--max-steps", 30)
    assert code == 0 and "trained to step 30" in stdout, err
    _same_weights(latest_checkpoint(whole_run), latest_checkpoint(run))


def test_sample_on_a_full_disk_leaves_only_whole_images_and_a_rerun_completes(tiny_run_module, expected_images,
                                                                             tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["sample", tiny_run_module, "--n", N_IMAGES, "--out", out, "--steps", 12, "--batch-size", 1,
            "--seed", 5, "--device", "cpu", "--no-progress"]
    with monkeypatch.context() as m:
        disk = FullDisk(4_000).install(m)  # job.json and a few images
        code, _, err = run_main(m, capsys, *args)
    _assert_disk_full_message(code, err)
    assert disk.failures >= 1
    written = sorted(out.glob("0*.png"))
    assert len(written) < N_IMAGES
    for path in written:
        with Image.open(path) as im:
            im.verify()
    assert not _no_temp_files(out)

    code, stdout, err = run_main(monkeypatch, capsys, *args)
    assert code == 0, err
    _check_job(out, expected_images)
