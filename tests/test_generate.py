"""Batch generation from a real (tiny) run folder: files, settings, resume after SIGKILL, torchrun split, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import make_tiny_run
from trainer_helpers import assert_within_one_level
from filelock import FileLock
from PIL import Image

from latentpatch.sampling import job_folder
from latentpatch.errors import UserError
from latentpatch.sampling.generate import sample

FAST = dict(steps=4, batch_size=4, device="cpu")


def _pixels(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def _index_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]


def test_sample_returns_pil_images_at_the_run_resolution(tiny_run):
    images = sample(tiny_run, n=3, **FAST)
    assert len(images) == 3
    assert all(im.size == (8, 8) and im.mode == "RGB" for im in images)
    assert len({im.tobytes() for im in images}) == 3


def test_images_do_not_depend_on_batch_size(tiny_run):
    one = sample(tiny_run, n=5, steps=4, batch_size=1, output="tensor", device="cpu")
    five = sample(tiny_run, n=5, steps=4, batch_size=5, output="tensor", device="cpu")
    assert one.shape == (5, 3, 8, 8) and one.dtype == torch.float32
    assert 0 <= one.min() and one.max() <= 1
    # The noise is the same bit for bit (test_sampling checks torch.equal with an exact denoiser); what is
    # left is the network's float32 GEMM rounding, which differs with the batch shape (~1e-7 per call); the
    # images are 8-bit, so a rounding on either side of a level's edge moves a rare pixel by one level.
    assert_within_one_level(one, five)
    first_two = sample(tiny_run, n=2, steps=4, batch_size=2, output="tensor", device="cpu")
    assert_within_one_level(first_two, one[:2])  # image i does not depend on n either


def test_ema_and_raw_weights_give_different_images(tiny_run):
    ema = sample(tiny_run, n=1, steps=4, output="tensor", device="cpu")
    raw = sample(tiny_run, n=1, steps=4, output="tensor", device="cpu", weights="raw")
    assert not torch.allclose(ema, raw, atol=1e-3)


def test_a_loaded_run_can_be_passed_and_records_the_weights_it_holds(tiny_run, tmp_path):
    from latentpatch.runs import load_run

    loaded = load_run(tiny_run, weights="raw")
    sample(loaded, n=1, out=tmp_path / "o", output="none", **FAST)
    assert job_folder.read_png_meta(tmp_path / "o" / "00000000.png")["weights"] == "raw"
    direct = sample(tiny_run, n=1, weights="raw", output="tensor", **FAST)
    assert torch.equal(sample(loaded, n=1, output="tensor", **FAST), direct)


def test_tensor_output_is_the_8_bit_pixels_of_the_pngs_with_or_without_out(tiny_run, tmp_path):
    kw = dict(n=3, seed=4, output="tensor", **FAST)
    in_memory = sample(tiny_run, **kw)
    from_job = sample(tiny_run, out=tmp_path / "out", **kw)
    assert torch.equal(in_memory, from_job)
    assert torch.equal(in_memory * 255, (in_memory * 255).round()) and 0 <= in_memory.min() and in_memory.max() <= 1
    pil = sample(tiny_run, n=3, seed=4, **FAST)
    pil_pixels = torch.stack([torch.from_numpy(np.asarray(im).copy()) for im in pil]).permute(0, 3, 1, 2)
    assert torch.equal(in_memory, pil_pixels / 255)


def test_the_api_the_job_file_and_eval_take_the_sampling_options_from_sample_options_alone():
    import inspect

    from latentpatch.metrics.evaluate import evaluate_run
    from latentpatch.sampling.options import DEFAULTS, SampleOptions, sample_options

    assert DEFAULTS == SampleOptions(steps=18, sampler="heun", guidance=1.0, churn=0.0, seed=0, batch_size=16)
    for function in (sample, evaluate_run):  # no option spelled again: `options` whole, or its fields as keywords
        params = inspect.signature(function).parameters
        assert params["options"].default is None and "settings" in params
        assert not {"steps", "sampler", "guidance", "churn", "seed", "batch_size", "size"} & set(params)
    assert sample_options(None, churn=0.5, size=8) == SampleOptions(churn=0.5, size=(8, 8))
    assert sample_options(SampleOptions(steps=4), guidance=2.0) == SampleOptions(steps=4, guidance=2.0)
    settings = DEFAULTS.job_settings()
    assert settings == {"sampler": "heun", "steps": 18, "guidance": 1.0, "churn": 0.0, "seed": 0}
    assert SampleOptions.from_job_settings(settings) == DEFAULTS


def test_a_job_folder_written_before_sample_options_resumes(tiny_run, tmp_path):
    out = tmp_path / "out"
    sample(tiny_run, n=2, out=out, output="none", seed=1, **FAST)
    job = json.loads((out / "job.json").read_text())
    # job.json as the release before SampleOptions wrote it: these keys, in this order.
    assert list(job["settings"]) == ["run", "checkpoint", "weights", "checkpoint_id", "step", "sampler", "steps",
                                     "guidance", "churn", "seed", "sigma_min", "sigma_max", "latent_shape",
                                     "autoencoder"]
    (out / "00000001.png").unlink()
    again = sample(tiny_run, n=2, out=out, output="none", seed=1, **FAST)
    assert (again.written, again.skipped) == (1, 1)


def test_job_writes_pngs_with_settings_an_index_a_grid_and_the_job_spec(tiny_run, tmp_path):
    out = tmp_path / "out"
    result = sample(tiny_run, n=5, out=out, output="none", seed=3, guidance=1.0, churn=0.5, **FAST)
    assert (result.total, result.written, result.skipped) == (5, 5, 0)
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:08d}.png" for i in range(5)] + ["grid.png"]
    in_memory = job_folder.to_uint8(sample(tiny_run, n=5, output="tensor", seed=3, churn=0.5, **FAST) * 2 - 1)
    for i in range(5):
        assert torch.equal(_pixels(out / f"{i:08d}.png"), in_memory[i])
    lines = _index_lines(out)
    assert [r["index"] for r in lines] == list(range(5))
    meta = job_folder.read_png_meta(out / "00000002.png")
    assert meta == lines[2]
    for key, value in dict(seed=3, steps=4, sampler="heun", guidance=1.0, churn=0.5, weights="ema", prompt=None,
                           file="00000002.png", run=str(tiny_run.resolve())).items():
        assert meta[key] == value, key
    assert meta["class"] is None and len(meta["checkpoint_id"]) == 16
    assert meta["checkpoint"].endswith("step-00000001") and meta["image_seed"] != meta["seed"]
    job = json.loads((out / "job.json").read_text())
    assert job["settings"]["steps"] == 4 and [im["index"] for im in job["images"]] == list(range(5))
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (3 * 10 + 2, 2 * 10 + 2)  # 3 per row, 2-pixel borders


def test_recorded_settings_make_the_image_again(tiny_run, tmp_path):
    out = tmp_path / "out"
    sample(tiny_run, n=4, out=out, output="none", seed=9, **FAST)
    m = job_folder.read_png_meta(out / "00000003.png")
    again = sample(m["run"], n=m["index"] + 1, seed=m["seed"], steps=m["steps"], sampler=m["sampler"],
                   guidance=m["guidance"], churn=m["churn"], weights=m["weights"], checkpoint=m["checkpoint"],
                   batch_size=4, output="tensor", device="cpu")  # the job's batches: the same arithmetic
    assert torch.equal(job_folder.to_uint8(again[-1:] * 2 - 1)[0], _pixels(out / "00000003.png"))


def test_rerun_with_the_same_settings_writes_nothing_and_other_settings_are_refused(tiny_run, tmp_path):
    out = tmp_path / "out"
    sample(tiny_run, n=3, out=out, output="none", **FAST)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("0*.png")}
    again = sample(tiny_run, n=3, out=out, output="none", **(FAST | dict(batch_size=2)))
    assert (again.written, again.skipped) == (0, 3)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("0*.png")} == before
    with pytest.raises(UserError, match=r"steps \(was 4, now 5\)"):
        sample(tiny_run, n=3, out=out, output="none", **(FAST | dict(steps=5)))
    with pytest.raises(UserError, match=r"seed \(was 0, now 1\)"):
        sample(tiny_run, n=3, out=out, output="none", seed=1, **FAST)
    with pytest.raises(UserError, match=r"the number of images \(was 3, now 4"):
        sample(tiny_run, n=4, out=out, output="none", **FAST)
    with pytest.raises(UserError, match=r"weights \(was 'ema', now 'raw'\)"):
        sample(tiny_run, n=3, out=out, output="none", weights="raw", **FAST)


def test_a_second_job_into_a_locked_folder_fails_at_once(tiny_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with FileLock(out / ".lock"):
        start = time.perf_counter()
        with pytest.raises(UserError, match="another sample job is writing to"):
            sample(tiny_run, n=2, out=out, output="none", **FAST)
        assert time.perf_counter() - start < 5
    assert not list(out.glob("*.png"))


def test_start_removes_temp_files_and_repairs_a_torn_index(tiny_run, tmp_path):
    out = tmp_path / "out"
    sample(tiny_run, n=3, out=out, output="none", **FAST)
    (out / "00000001.png").unlink()
    (out / ".00000001.png.k3j2x.tmp").write_bytes(b"\x89PNG half")
    with open(out / "images.jsonl", "a") as f:
        f.write('{"index": 1, "fi')  # a line cut by a kill
    result = sample(tiny_run, n=3, out=out, output="none", **FAST)
    assert (result.written, result.skipped) == (1, 2)
    assert not list(out.glob(".*.tmp"))
    assert [r["index"] for r in _index_lines(out)] == [0, 1, 2]


RESUME_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from latentpatch.sampling.generate import sample
sample(sys.argv[1], n=12, out=sys.argv[2], output="none", steps=24, batch_size=1, device="cpu", seed=5)
"""


def test_a_job_killed_with_sigkill_resumes_and_writes_each_image_exactly_once(tiny_run, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, str(tiny_run), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(list(out.glob("0*.png"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the job never wrote 2 images"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    survivors = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("0*.png")}
    assert 2 <= len(survivors) < 12, "the kill did not land mid-job"
    result = sample(tiny_run, n=12, out=out, output="none", steps=24, batch_size=1, device="cpu", seed=5)
    assert result.skipped == len(survivors) and result.written == 12 - len(survivors)
    names = sorted(p.name for p in out.glob("0*.png"))
    assert names == [f"{i:08d}.png" for i in range(12)]
    for name, stat in survivors.items():  # nothing written twice
        assert (out / name).stat().st_ino == stat[0] and (out / name).stat().st_mtime_ns == stat[1]
    for name in names:
        with Image.open(out / name) as im:
            im.verify()
    assert not list(out.glob(".*.tmp"))
    assert [r["index"] for r in _index_lines(out)] == list(range(12))
    expected = sample(tiny_run, n=12, steps=24, batch_size=1, seed=5, output="tensor", device="cpu")
    expected = job_folder.to_uint8(expected * 2 - 1)
    for i in range(12):
        assert torch.equal(_pixels(out / f"{i:08d}.png"), expected[i])


TORCHRUN_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from latentpatch.sampling.generate import sample
r = sample(sys.argv[1], n=5, out=sys.argv[2], output="none", steps=4, batch_size=1, device="cpu", seed=2)
print("written", r.written)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_splits_a_job_and_gives_the_images_of_one_process(tiny_run, tmp_path):
    # Two workers with the environment torchrun gives them (RANK, WORLD_SIZE, MASTER_*), without its agent
    # process: one torch import fewer on two shared cores.
    out, script = tmp_path / "out", tmp_path / "job.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = os.environ | {"OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, str(script), str(tiny_run), str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-3000:]
    assert [o[0].split()[-1] for o in outputs] == ["3", "2"]  # rank r made images r, r + 2, ...
    expected = sample(tiny_run, n=5, steps=4, batch_size=1, seed=2, output="tensor", device="cpu")
    expected = job_folder.to_uint8(expected * 2 - 1)
    for i in range(5):
        assert torch.equal(_pixels(out / f"{i:08d}.png"), expected[i])
    assert [r["index"] for r in _index_lines(out)] == list(range(5))
    assert (out / "grid.png").exists()


def test_class_labels_are_recorded_and_checked(tiny_class_run, tmp_path):
    out = tmp_path / "out"
    sample(tiny_class_run, n=2, class_labels=[2, 0], guidance=2.0, out=out, output="none", **FAST)
    lines = _index_lines(out)
    assert [(r["class"], r["class_name"]) for r in lines] == [(2, "class2")] * 2 + [(0, "class0")] * 2
    assert lines[0]["guidance"] == 2.0
    with pytest.raises(UserError, match=r"class 3 is out of range: this model has classes 0..2"):
        sample(tiny_class_run, n=1, class_labels=3, **FAST)
    with pytest.raises(UserError, match="this model is not text-conditioned"):
        sample(tiny_class_run, n=1, prompts=["a cat"], **FAST)


def test_a_class_model_without_a_class_draws_one_per_image_from_the_seed(tiny_class_run, tmp_path):
    sample(tiny_class_run, n=12, out=tmp_path / "a", output="none", steps=1, batch_size=12, device="cpu")
    classes = [r["class"] for r in _index_lines(tmp_path / "a")]
    assert set(classes) == {0, 1, 2}
    sample(tiny_class_run, n=3, out=tmp_path / "b", output="none", steps=1, batch_size=12, device="cpu")
    assert [r["class"] for r in _index_lines(tmp_path / "b")] == classes[:3]


def test_unconditional_model_refuses_classes_prompts_and_guidance(tiny_run):
    with pytest.raises(UserError, match="this model has no classes"):
        sample(tiny_run, n=1, class_labels=0, **FAST)
    with pytest.raises(UserError, match="this model is not text-conditioned"):
        sample(tiny_run, n=1, prompts="a cat", **FAST)
    with pytest.raises(UserError, match="needs a class- or text-conditioned model"):
        sample(tiny_run, n=1, guidance=3.0, **FAST)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(n=0), "--n must be a whole number >= 1"),
        (dict(steps=0), "--steps must be a whole number >= 1"),
        (dict(guidance=-1.0), "--guidance must be >= 0"),
        (dict(sampler="ddpm"), "unknown sampler 'ddpm'"),
        (dict(batch_size=0), "--batch-size must be a whole number >= 1"),
        (dict(weights="best"), "weights must be 'ema' or 'raw'"),
        (dict(output="numpy"), "output must be"),
    ],
)
def test_bad_arguments_are_user_errors(tiny_run, kw, message):
    with pytest.raises(UserError, match=message):
        sample(tiny_run, **({"n": 1} | FAST | kw))


def test_an_unwritable_output_folder_is_a_user_error(tiny_run, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot create the output folder"):
        sample(tiny_run, n=1, out=blocker / "sub", output="none", **FAST)


def test_a_run_without_a_checkpoint_is_a_user_error(tmp_path):
    run = make_tiny_run(tmp_path / "empty", checkpoint=False)
    with pytest.raises(UserError, match="no checkpoint"):
        sample(run, n=1, **FAST)


def test_a_missing_autoencoder_names_the_one_the_run_needs(tiny_run):
    info = json.loads((tiny_run / "run.json").read_text())
    info["autoencoder"] = {"kind": "kl", "source": "/nowhere/my-vae", "revision": "abc123", "latent_channels": 3,
                           "factor": 1, "scaling_factor": 0.18215, "shift_factor": 0.0}
    (tiny_run / "run.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match=r"this run needs the autoencoder '/nowhere/my-vae' \(kind kl"):
        sample(tiny_run, n=1, **FAST)


def test_prompts_file_reading(tmp_path):
    from latentpatch.sampling.prompts import PromptEntry, read_prompts

    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \n")
    assert read_prompts(txt, 2) == [PromptEntry("a cat", 2), PromptEntry("a dog", 2)]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a cat", "count": 3}\n{"prompt": "a dog"}\n')
    assert read_prompts(jl, 2) == [PromptEntry("a cat", 3), PromptEntry("a dog", 2)]
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UserError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt", 1)
    with pytest.raises(UserError, match="prompts file not found"):
        read_prompts(tmp_path / "missing.txt", 1)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "count": 0}\n')
    with pytest.raises(UserError, match=r"bad.jsonl line 1: \"count\" must be a whole number >= 1"):
        read_prompts(tmp_path / "bad.jsonl", 1)
    (tmp_path / "bad2.jsonl").write_text('{"prompt": "x"}\n{"text": "y"}\n')
    with pytest.raises(UserError, match='line 2 needs an object with a "prompt" string'):
        read_prompts(tmp_path / "bad2.jsonl", 1)


def test_grid_is_near_square_with_each_image_in_its_cell():
    images = torch.randint(1, 256, (5, 3, 4, 6), dtype=torch.uint8)
    grid = job_folder.make_grid(images)
    assert grid.shape == (3, 2 * (4 + 2) + 2, 3 * (6 + 2) + 2) and grid.dtype == torch.uint8
    for k in range(5):
        top, left = 2 + (k // 3) * 6, 2 + (k % 3) * 8
        assert torch.equal(grid[:, top : top + 4, left : left + 6], images[k])


def test_a_run_folder_written_by_latentpatch_0_1_still_loads_and_samples_the_same_images(tmp_path):
    """0.1 wrote a flat model section, conditioning keys at the top of run.json and RNG state in state.json."""
    import shutil

    import yaml

    from latentpatch.checkpoints import latest_checkpoint

    new = make_tiny_run(tmp_path / "new", num_classes=3)
    old = shutil.copytree(new, tmp_path / "old")
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    dit = cfg["model"].pop("dit")
    unet = cfg["model"].pop("unet")
    cfg["model"].pop("pretrained")
    cfg["model"].update(dit, unet_config=None, **{f"unet_{k}": v for k, v in unet.items()})
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    info = json.loads((old / "run.json").read_text())
    spec = info.pop("conditioning")
    info.update(num_classes=spec["num_classes"], class_names=spec["class_names"], text_encoder=None)
    (old / "run.json").write_text(json.dumps(info))
    state_path = latest_checkpoint(old) / "state.json"
    state = json.loads(state_path.read_text())
    state.update(rng={"torch": "", "cuda": []}, patch_schedule_step=state["step"], data_step=state["step"])
    state_path.write_text(json.dumps(state))
    a = sample(new, n=2, class_labels=[1], **FAST, output="tensor")
    b = sample(old, n=2, class_labels=[1], **FAST, output="tensor")
    assert torch.equal(a, b)
