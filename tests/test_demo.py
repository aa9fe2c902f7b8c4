"""The built-in default: the demo's data set, and the whole demo end to end in a shortened mode."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image
from text_helpers import write_clip_config

from latentpatch.demo.images import DEMO_SOURCES, make_demo_images


def test_demo_images_are_captioned_crops_whose_colour_follows_the_caption(tmp_path):
    counts = make_demo_images(tmp_path, per_caption=6, size=32, seed=1)
    assert counts == {c: 6 for c in DEMO_SOURCES}
    meta = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 24 and {m["text"] for m in meta} == set(DEMO_SOURCES)
    mean = {}
    for m in meta:
        img = np.asarray(Image.open(tmp_path / m["file_name"]), dtype=np.float64)
        assert img.shape == (32, 32, 3)
        mean.setdefault(m["text"], []).append(img.reshape(-1, 3).mean(0))
    rgb = {k: np.mean(v, axis=0) for k, v in mean.items()}
    assert np.argmax(rgb["red brick wall"]) == 0
    assert np.argmax(rgb["green grass"]) == 1
    assert np.argmax(rgb["blue gravel"]) == 2
    assert rgb["starry night sky"].sum() < rgb["green grass"].sum()  # dark


def test_demo_runs_end_to_end_and_writes_its_pictures(tmp_path):
    clip = write_clip_config(tmp_path / "tiny-clip.json")
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "latentpatch.cli", "demo", "--out", str(out), "--steps", "6",
           "--per-caption", "2", "--samples", "1", "--no-progress", "--text-encoder", str(clip), "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    samples = Image.open(out / "samples.png")
    assert samples.size[0] > 0 and samples.mode == "RGB"
    assert (out / "loss.png").stat().st_size > 0
    assert (out / "run" / "checkpoints" / "LATEST").exists()
    assert "samples (a row per prompt" in res.stdout and "latentpatch encode my_images/" in res.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # a rerun resumes: nothing is redone
    assert again.returncode == 0, again.stdout + again.stderr
    assert "encoded 0 images" in again.stdout and "already trained (6 steps)" in again.stdout


def test_loading_a_vae_without_accelerate_prints_nothing_for_the_user(monkeypatch):
    """Without the optional accelerate package diffusers warned, once per model load, to install it."""
    import logging

    from diffusers.models import modeling_utils

    from latentpatch.autoencoders import load_autoencoder

    monkeypatch.setattr(modeling_utils, "is_accelerate_available", lambda: False)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("diffusers").addHandler(handler)
    try:
        load_autoencoder("builtin")
        load_autoencoder("builtin")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert not [r.getMessage() for r in records if "accelerate" in r.getMessage()]


def test_the_builtin_vae_keeps_each_demo_captions_colour(tmp_path):
    """The demo's captions name colours, so its autoencoder must give them back (the old one turned green grey)."""
    import torch

    from latentpatch.autoencoders import load_autoencoder

    make_demo_images(tmp_path, per_caption=4, size=32, seed=2)
    meta = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(tmp_path / m["file_name"]), dtype=np.float32))
                     for m in meta]).permute(0, 3, 1, 2) / 127.5 - 1
    ae = load_autoencoder("builtin")
    with torch.no_grad():
        y = ae.decode(ae.encode(x, sample=False))
    for caption in ("red brick wall", "green grass", "blue gravel"):
        rows = [i for i, m in enumerate(meta) if m["text"] == caption]
        before, after = x[rows].mean((0, 2, 3)), y[rows].mean((0, 2, 3))
        assert after.argmax() == before.argmax(), (caption, before, after)
        assert (after - before).abs().max() < 0.1, (caption, before, after)
