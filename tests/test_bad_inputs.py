"""Bad input across the CLI that the per-command tests do not already cover: each one is a single `error: ...`
line, exit code 2 and no traceback, through the console entry point (latentpatch.cli.app.main).

docs/reliability.md lists these together with the ones covered elsewhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_runs import make_tiny_run
from helpers import make_image_folder, run_main
from trainer_helpers import make_store, photo_crops


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """What the bad inputs point at: images, a store, a trained run, a file, a junk folder."""
    root = tmp_path_factory.mktemp("world")
    make_image_folder(root / "images", n=2, size=32, formats=("png",))
    junk = root / "junk"
    junk.mkdir()
    (junk / "broken.png").write_bytes(b"\x89PNG not really")
    (junk / "manifest.json").write_text("{not json")
    (root / "file.txt").write_text("a file, not a folder")
    (root / "bad.yaml").write_text("model: [unclosed\n")
    (root / "unknown.yaml").write_text("model:\n  depth_of_field: 3\n")
    (root / "empty.yaml").write_text("# settings to come\n")
    make_store(root / "store", photo_crops(4, 16))
    run = make_tiny_run(root / "run")
    garbled = make_tiny_run(root / "garbled_run")
    (garbled / "config.yaml").write_text("model: {hidden_size: [\n")
    return {"root": root, "images": root / "images", "junk": junk, "file": root / "file.txt",
            "bad_yaml": root / "bad.yaml", "unknown_yaml": root / "unknown.yaml", "empty_yaml": root / "empty.yaml", "store": root / "store",
            "run": run, "garbled_run": garbled}


def _enc(w, *extra):
    return ["encode", w["images"], "--vae", "pixel", "--resolution", 32, "--out", w["root"] / "enc_out",
            "--workers", 0, "--no-progress", *extra]


def _train(w, *extra, out="train_out"):
    return ["train", "--latents", w["store"], "--out", w["root"] / out, "--device", "cpu", "--no-progress", *extra]


def _sample(w, *extra, run="run"):
    return ["sample", w[run], "--n", 1, "--out", w["root"] / "sample_out", "--steps", 2, "--device", "cpu",
            "--no-progress", *extra]


# (id, arguments from the world, a part of the message)
BAD_INPUTS = [
    ("encode-out-is-a-file", lambda w: ["encode", w["images"], "--vae", "pixel", "--resolution", 32, "--out",
                                        w["file"], "--workers", 0], "is a file"),
    ("encode-shard-size-0", lambda w: _enc(w, "--shard-size", 0), "--shard-size"),
    ("encode-dtype-int8", lambda w: _enc(w, "--dtype", "int8"), "--dtype"),
    ("encode-workers-negative", lambda w: _enc(w, "--workers", -1), "--workers"),
    ("encode-vae-folder-without-model", lambda w: _enc(w, "--vae", w["junk"]), str("junk")),
    ("encode-device-unknown", lambda w: _enc(w, "--device", "quantum"), "quantum"),
    ("train-latents-junk-manifest", lambda w: ["train", "--latents", w["junk"], "--config", "tiny", "--out",
                                               w["root"] / "t1"], "manifest.json"),
    ("train-latents-is-image-folder", lambda w: ["train", "--latents", w["images"], "--config", "tiny", "--out",
                                                 w["root"] / "t2"], "latent store"),
    ("train-config-name-unknown", lambda w: _train(w, "--config", "no-such-preset"), "no-such-preset"),
    ("train-config-bad-yaml", lambda w: _train(w, "--config", w["bad_yaml"]), "bad.yaml"),
    ("train-config-unknown-key-in-file", lambda w: _train(w, "--config", w["unknown_yaml"]), "depth_of_field"),
    ("train-config-empty-file", lambda w: _train(w, "--config", w["empty_yaml"], "--max-steps", 1, out="t3"),
     "empty.yaml is empty"),
    ("train-override-without-equals", lambda w: _train(w, "--config", "tiny", "train.max_steps"), "train.max_steps"),
    ("train-override-wrong-type", lambda w: _train(w, "--config", "tiny", "train.max_steps=many"), "train.max_steps"),
    ("train-device-unknown", lambda w: _train(w, "--config", "tiny", "--device", "quantum"), "quantum"),
    ("train-resume-empty-folder", lambda w: _train(w, "--resume", out="never_trained"), "no run to resume"),
    ("train-new-run-over-checkpoints", lambda w: _train(w, "--config", "tiny", out="run"), "already has checkpoints"),
    ("train-resume-other-config", lambda w: _train(w, "--resume", "--config", "tiny", "model.dit.depth=3", out="run"),
     "config differs"),
    ("train-out-is-a-file", lambda w: _train(w, "--config", "tiny", out="file.txt"), "is a file"),
    ("sample-checkpoint-missing", lambda w: _sample(w, "--checkpoint", "step-00000999"), "step-00000999"),
    ("sample-batch-size-0", lambda w: _sample(w, "--batch-size", 0), "--batch-size"),
    ("sample-out-is-a-file", lambda w: ["sample", w["run"], "--n", 1, "--out", w["file"], "--device", "cpu"],
     "file.txt"),
    ("sample-garbled-config", lambda w: _sample(w, run="garbled_run"), "config.yaml"),
    ("sample-run-is-a-file", lambda w: ["sample", w["file"], "--n", 1, "--out", w["root"] / "s2"], "file.txt"),
    ("sample-device-unknown", lambda w: _sample(w, "--device", "quantum"), "quantum"),
    ("sample-churn-negative", lambda w: _sample(w, "--churn", -1), "--churn"),
    ("encode-max-aspect-infinite", lambda w: _enc(w, "--buckets", "--max-aspect", "inf"), "--max-aspect must be a finite"),
]


@pytest.mark.parametrize("make_args,message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_exit_2(world, monkeypatch, capsys, make_args, message):
    code, _, err = run_main(monkeypatch, capsys, *make_args(world))
    assert code == 2, err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("args", [["train", "--max-steps", "many"], ["sample", "RUN", "--n", "lots"],
                                  ["encode", "IMAGES", "--resolution", "32", "--no-such-option"]],
                         ids=["train-int-not-a-number", "sample-int-not-a-number", "encode-unknown-option"])
def test_options_the_parser_rejects_exit_2_with_usage_not_a_traceback(world, monkeypatch, capsys, args):
    args = [str(world["run"]) if a == "RUN" else str(world["images"]) if a == "IMAGES" else a for a in args]
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and "Traceback" not in err and ("Invalid value" in err or "No such option" in err), err


def test_a_second_train_into_the_same_run_folder_is_refused_while_the_first_runs(world, tmp_path, monkeypatch,
                                                                                  capsys):
    run = tmp_path / "run"
    cmd = ["train", "--latents", world["store"], "--out", run, "--device", "cpu", "--no-progress", "--config",
           "tiny", "--max-steps", 100000, "train.ckpt_every=100000"]
    first = subprocess.Popen([sys.executable, "-m", "latentpatch.cli", *map(str, cmd)], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "run.json").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        code, _, err = run_main(monkeypatch, capsys, "train", "--latents", world["store"], "--out", run, "--resume",
                                "--device", "cpu", "--no-progress", "--max-steps", 3)
        assert code == 2 and err.startswith(f"error: another train is writing to {run}"), err
        assert "Traceback" not in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The lock dies with its holder: the killed run's folder can be resumed straight away.
    code, stdout, err = run_main(monkeypatch, capsys, "train", "--latents", world["store"], "--out", run, "--resume",
                                 "--device", "cpu", "--no-progress", "--max-steps", 2)
    assert code == 0, err


def test_resume_after_an_edit_of_the_model_size_names_the_first_tensor_that_does_not_fit(world, tmp_path,
                                                                                        monkeypatch, capsys):
    run = make_tiny_run(tmp_path / "run", side=16)  # on the world's 3 x 16 x 16 store
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("hidden_size: 32", "hidden_size: 64"))
    code, _, err = run_main(monkeypatch, capsys, "train", "--latents", world["store"], "--out", run, "--resume",
                            "--device", "cpu", "--no-progress", "--max-steps", 2)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {run}/checkpoints/step-00000001/model.safetensors does not fit the model built "
                          "from the run's config: tensor "), err
    assert "in the checkpoint and [" in err and "config.yaml edited" in err, err


def test_sample_latest_when_latest_names_a_deleted_checkpoint_says_which_it_took(tmp_path, monkeypatch, capsys):
    run = make_tiny_run(tmp_path / "run")
    (run / "checkpoints" / "LATEST").write_text("step-00000009\n")  # step 9 was deleted by hand
    code, out, err = run_main(monkeypatch, capsys, "sample", run, "--n", 1, "--out", tmp_path / "s", "--steps", 2,
                              "--device", "cpu", "--no-progress", "--checkpoint", "latest")
    assert code == 0, err
    assert err.strip() == (f"warning: {run}/checkpoints/LATEST names step-00000009, which is missing or incomplete "
                           "(deleted?); using step-00000001, the newest complete checkpoint"), err


def test_a_size_that_cannot_fit_is_refused_in_one_line_before_anything_is_written(world, tmp_path, monkeypatch,
                                                                                  capsys):
    out = tmp_path / "samples"
    code, _, err = run_main(monkeypatch, capsys, "sample", world["run"], "--n", 1, "--out", out, "--steps", 2,
                            "--device", "cpu", "--no-progress", "--size", "100000x100000")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: --size 100000x100000 (latent 100000x100000) cannot be sampled on cpu: a batch of 1 "
                          "needs at least "), err
    assert not out.exists()  # no job.json to refuse the folder for another size
    code, _, err = run_main(monkeypatch, capsys, "sample", world["run"], "--n", 1, "--out", out, "--steps", 2,
                            "--device", "cpu", "--no-progress", "--size", "16x8")
    assert code == 0, err


def test_a_prompt_longer_than_the_text_encoder_reads_is_said_once_in_one_line(tmp_path, monkeypatch, capsys):
    from text_helpers import colour_folder, write_clip_config

    import latentpatch as lp
    from latentpatch.config import load_config

    clip = write_clip_config(tmp_path / "tiny-clip.json")
    lp.encode(colour_folder(tmp_path / "images", n=3), tmp_path / "store", "pixel", 8, workers=0,
              text_encoder=str(clip))
    cfg = load_config("tiny", ["train.max_steps=1", "train.ckpt_every=1", "model.attention=sdpa"])
    lp.train(cfg, tmp_path / "store", tmp_path / "run", progress=False, device="cpu")
    prompt = "red " * 2500  # 10,000 characters
    code, out, err = run_main(monkeypatch, capsys, "sample", tmp_path / "run", "--prompt", prompt, "--n", 2,
                              "--batch-size", 1, "--out", tmp_path / "s", "--steps", 2,
                              "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert err.strip() == ("warning: text 'red red red red red red red red red red red red red red r...' is 2502 "
                           "tokens, longer than the text encoder's 77: its last 2425 tokens were dropped"), err
