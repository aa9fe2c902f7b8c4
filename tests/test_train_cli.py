"""`latentpatch train`: a run killed with SIGKILL resumes to the same weights; user errors exit 2 cleanly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from trainer_helpers import assert_same_weights, make_store, photo_crops, tiny_overrides
from typer.testing import CliRunner

from latentpatch.checkpoints import latest_checkpoint
from latentpatch.cli.app import app
from latentpatch.config import load_config
from latentpatch.errors import UserError
from latentpatch.training.trainer import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store"), photo_crops(32, 16))


def _cli(*args):
    return [sys.executable, "-m", "latentpatch.cli", "train", *map(str, args)]


def test_run_killed_mid_training_resumes_to_the_same_weights(store, tmp_path):
    over = tiny_overrides(**{"train.max_steps": 40, "train.ckpt_every": 5, "train.log_every": 5})
    run = tmp_path / "run"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(_cli("--latents", store, "--config", "tiny", "--out", run, "--device", "cpu",
                                     "--no-progress", *over), env=ENV, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 300
        while latest_checkpoint(run) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    killed_at = int(json.loads((latest_checkpoint(run) / "state.json").read_text())["step"])
    assert 5 <= killed_at < 40

    # Resume through the CLI with the run's own config (no --config needed).
    done = subprocess.run(_cli("--latents", store, "--out", run, "--resume", "--device", "cpu", "--no-progress"),
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained to step 40" in done.stdout

    whole = train(load_config("tiny", over), store, tmp_path / "whole", progress=False, device="cpu")
    resumed = latest_checkpoint(run)
    assert resumed.name == whole.checkpoint.name == "step-00000040"
    assert_same_weights(whole.checkpoint, resumed)
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 41, 5))  # the killed run's extra lines were dropped on resume


def test_missing_store_prints_one_error_line_and_exits_2(tmp_path):
    proc = subprocess.run(_cli("--latents", tmp_path / "nope", "--config", "tiny", "--out", tmp_path / "run"),
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: latent store") and "Traceback" not in proc.stderr


def _invoke(*args):
    return CliRunner().invoke(app, ["train", *map(str, args)])


def test_unknown_config_key_is_named(store, tmp_path):
    result = _invoke("--latents", store, "--config", "tiny", "--out", tmp_path / "run", "train.batchsize=4")
    assert isinstance(result.exception, UserError)
    assert "train.batchsize" in str(result.exception)


def test_new_run_needs_a_config(store, tmp_path):
    result = _invoke("--latents", store, "--out", tmp_path / "run")
    assert isinstance(result.exception, UserError) and "--config" in str(result.exception)


def test_overrides_reach_the_saved_config(store, tmp_path):
    result = _invoke("--latents", store, "--config", "tiny", "--out", tmp_path / "run", "--max-steps", "2",
                     "--device", "cpu", "--no-progress", "optim.lr=0.0005", "patches.real_p=1.0")
    assert result.exit_code == 0, result.output
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert (saved.optim.lr, saved.patches.real_p, saved.train.max_steps) == (0.0005, 1.0, 2)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["latent_shape"] == [3, 16, 16] and info["autoencoder"]["kind"] == "pixel"
    assert info["latents"] == str(store.resolve())


def test_help_explains_every_option():
    result = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--latents", "--config", "--out", "--resume", "--max-steps", "--device", "overrides"):
        assert option in result.output
