"""Sampling at any shape (issue 23): `size` in lp.sample, the grid of that shape, the trained-size notice, bad sizes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from tiny_runs import make_tiny_run

from latentpatch.checkpoints import save_checkpoint
from latentpatch.config import load_config, save_config
from latentpatch.denoiser import build_precond
from latentpatch.errors import Notice, UserError
from latentpatch.patches import full_coordinates
from latentpatch.runs import load_run
from latentpatch.sampling.generate import sample
from latentpatch.sampling.options import DEFAULTS, SampleOptions
from latentpatch.sampling.shape import parse_size

FAST = dict(steps=3, batch_size=4, device="cpu")


def remake(run: Path, overrides: list[str], conditioning: dict | None = None) -> Path:
    """The tiny run with config `overrides` (and run.json `conditioning`), its checkpoint rebuilt to fit them."""
    cfg = load_config(run / "config.yaml", overrides)
    save_config(cfg, run / "config.yaml")
    if conditioning is not None:
        info = json.loads((run / "run.json").read_text())
        info["conditioning"] = conditioning
        (run / "run.json").write_text(json.dumps(info))
    torch.manual_seed(0)
    model = build_precond(cfg, 3, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    save_checkpoint(run, 1, model, model, torch.optim.AdamW(model.parameters()), {"nimg": 0})
    return run


def set_buckets(run: Path, buckets: list[list[int]]) -> Path:
    info = json.loads((run / "run.json").read_text())
    info["buckets"] = buckets  # latent [h, w] of each bucket, as a bucketed training run records them
    (run / "run.json").write_text(json.dumps(info))
    return run


@pytest.fixture
def run8(tmp_path: Path) -> Path:
    """A 16 x 16 pixel run whose DiT patch size is 8: sizes must be multiples of 8."""
    return remake(make_tiny_run(tmp_path / "run8", side=16), ["model.dit.patch_size=8"])


def recording(run: Path):
    """The run loaded, with every coordinate tensor its denoiser is called with appended to a list."""
    loaded = load_run(run)
    seen: list[torch.Tensor] = []
    loaded.precond.register_forward_pre_hook(lambda module, args: seen.append(args[2].clone()))
    return loaded, seen


@pytest.mark.parametrize("scale", ["per-axis", "longer-side"])
def test_a_non_square_size_gives_that_shape_and_the_network_sees_its_full_grid(tiny_run, scale):
    if scale != "longer-side":  # the default of a new run
        remake(tiny_run, [f"patches.coordinate_scale={scale}"])
    loaded, seen = recording(tiny_run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        images = sample(loaded, n=3, size=(8, 16), output="tensor", **FAST)
    assert images.shape == (3, 3, 8, 16)
    expected = full_coordinates(3, 8, 16, dtype=torch.float32, scale=scale)
    assert len(seen) == 2 * 3 - 1 and all(torch.equal(c, expected) for c in seen)
    x, y = seen[0][0, 0], seen[0][0, 1]
    assert x[0, 0] == -1 and x[0, -1] == 1  # the longer axis spans [-1, 1] either way
    top = -1.0 if scale == "per-axis" else -7 / 15  # longer-side: (2k - 7) / 15 on the 8-high axis
    assert y[0, 0] == torch.tensor(top, dtype=torch.float32) and y[-1, 0] == torch.tensor(-top, dtype=torch.float32)


def test_the_default_size_is_the_training_size_and_asking_for_it_changes_nothing(tiny_run, tmp_path):
    today = sample(tiny_run, n=3, output="tensor", **FAST)
    assert today.shape == (3, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Notice)  # the trained size: no notice
        for size in ((8, 8), 8, [8, 8]):
            assert torch.equal(sample(tiny_run, n=3, size=size, output="tensor", **FAST), today)
    sample(tiny_run, n=2, out=tmp_path / "a", output="none", **FAST)
    sample(tiny_run, n=2, out=tmp_path / "b", output="none", size=8, **FAST)
    a, b = (json.loads((tmp_path / x / "job.json").read_text()) for x in "ab")
    assert a == b and "size" not in a["settings"]  # the job.json a job always wrote, so old jobs resume
    again = sample(tiny_run, n=2, out=tmp_path / "a", output="none", size=(8, 8), **FAST)
    assert (again.written, again.skipped) == (0, 2)


def test_a_longer_side_run_samples_squares_exactly_as_a_per_axis_run(tiny_run):
    remake(tiny_run, [])  # the same weights again, written by remake
    per_axis = sample(tiny_run, n=2, output="tensor", **FAST)
    remake(tiny_run, ["patches.coordinate_scale=longer-side"])
    assert torch.equal(sample(tiny_run, n=2, output="tensor", **FAST), per_axis)


def test_the_job_records_the_size_and_another_size_is_another_job(tiny_run, tmp_path):
    out = tmp_path / "out"
    with pytest.warns(Notice):
        sample(tiny_run, n=2, out=out, output="none", size=(16, 8), **FAST)
    settings = json.loads((out / "job.json").read_text())["settings"]
    assert settings["size"] == [16, 8] and settings["latent_shape"] == [3, 16, 8]
    assert SampleOptions.from_job_settings(settings).size == (16, 8)
    from latentpatch.sampling.job_folder import read_png_meta

    assert read_png_meta(out / "00000001.png")["size"] == [16, 8]
    with pytest.raises(UserError, match=r"--size \(was 8x16, now 16x8; W x H\)"), pytest.warns(Notice):
        sample(tiny_run, n=2, out=out, output="none", size=(8, 16), **FAST)
    with pytest.raises(UserError, match=r"--size \(was 8x16, now the run's own; W x H\)"):
        sample(tiny_run, n=2, out=out, output="none", **FAST)
    assert sorted(p.name for p in out.glob("0*.png")) == ["00000000.png", "00000001.png"]


def test_an_untrained_shape_warns_once_naming_the_nearest_trained_size(tiny_run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample(tiny_run, n=3, size=(16, 8), batch_size=1, steps=2, device="cpu")
    notices = [str(w.message) for w in caught if issubclass(w.category, Notice)]
    assert notices == ["--size 8x16: this run never trained at that shape at full size; the nearest size it "
                       "trained at is 8x8 (W x H). Sampling at 8x16 anyway"]


def test_another_torchrun_rank_samples_an_untrained_shape_without_repeating_the_notice(tiny_run, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # rank 0 says it once for the job
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = sample(tiny_run, n=1, size=(16, 8), output="tensor", **FAST)
    assert images.shape == (1, 3, 16, 8) and not [w for w in caught if issubclass(w.category, Notice)]


@pytest.mark.parametrize("size,nearest", [((8, 16), "10x6"), ((16, 8), "6x10"), ((12, 12), "8x8"), ((6, 8), "10x6"),
                                          ((8, 10), "8x8"), ((4, 12), "10x6")])
def test_the_nearest_trained_size_is_the_nearest_bucket_by_log_aspect(tiny_run, size, nearest):
    set_buckets(tiny_run, [[10, 6], [8, 8], [6, 10]])
    with pytest.warns(Notice, match=f"the nearest size it trained at is {nearest} "):
        assert sample(tiny_run, n=1, size=size, output="tensor", **FAST).shape == (1, 3, *size)


def test_every_trained_bucket_samples_without_a_notice(tiny_run):
    set_buckets(tiny_run, [[10, 6], [8, 8], [6, 10]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", Notice)
        for size in ((10, 6), (8, 8), (6, 10)):
            assert sample(tiny_run, n=1, size=size, output="tensor", **FAST).shape == (1, 3, *size)


BAD_SIZES = [
    (0, r"--size 0x0 \(W x H; size=\(0, 0\) in Python, H first\) does not fit this run: each side must be a "
        r"positive multiple of 8 pixels \(the autoencoder's factor 1 x the network's size multiple 8\); a valid "
        r"size near it is --size 8x8 \(size=\(8, 8\)\)"),
    (-16, r"--size -16x-16 .* a valid size near it is --size 16x16 \(size=\(16, 16\)\)"),
    (30, r"--size 30x30 .* multiple of 8 pixels .* --size 32x32 \(size=\(32, 32\)\)"),
    ((16, 30), r"--size 30x16 \(W x H; size=\(16, 30\) in Python, H first\) .* --size 32x16 \(size=\(16, 32\)\)"),
    ((16, -8), r"--size -8x16 .* --size 8x16 \(size=\(16, 8\)\)"),
    ((64,), r"size must be \(H, W\) in pixels \(height first\) or N for a square .* got \(64,\)"),
    ("64x32", r"size must be \(H, W\) .*--size WxH or N on the command line.* got '64x32'"),
    ((16.0, 16), r"size must be \(H, W\) .* got \(16.0, 16\)"),
    (True, r"size must be \(H, W\) .* got True"),
]


@pytest.mark.parametrize("size,message", BAD_SIZES, ids=[str(s) for s, _ in BAD_SIZES])
def test_a_bad_size_is_one_clear_line_and_writes_nothing(run8, tmp_path, size, message):
    with pytest.raises(UserError, match=message) as error:
        sample(run8, n=1, out=tmp_path / "out", size=size, **FAST)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_size_on_the_multiple_samples(run8):
    with pytest.warns(Notice, match="the nearest size it trained at is 16x16"):
        assert sample(run8, n=1, size=(8, 24), output="tensor", **FAST).shape == (1, 3, 8, 24)


def test_guidance_and_batches_work_at_any_size(tiny_class_run):
    kw = dict(n=2, class_labels=[0, 2], guidance=2.0, size=(8, 16), output="tensor", steps=3, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        one, four = sample(tiny_class_run, batch_size=1, **kw), sample(tiny_class_run, batch_size=4, **kw)
        unguided = sample(tiny_class_run, batch_size=4, **(kw | dict(guidance=1.0)))
    assert one.shape == (4, 3, 8, 16)
    # Image i does not depend on its batch at any shape: the same noise, and the network's float32 rounding,
    # which differs with the batch shape (~1e-7), at most flips a pixel's 8-bit rounding by one level.
    assert torch.allclose(one, four, rtol=0, atol=1.01 / 255)
    assert not torch.allclose(four, unguided, atol=1e-3)


def test_text_prompts_sample_at_any_size(tiny_run, tmp_path):
    from text_helpers import write_clip_config

    from latentpatch.conditioning import ConditioningSpec
    from latentpatch.text.loader import load_text_encoder

    record = load_text_encoder(str(write_clip_config(tmp_path / "clip.json")), None, device="cpu").record
    remake(tiny_run, ["model.text_dim=32", "model.pooled_text_dim=32"],
           ConditioningSpec(text_encoder=record, pooled=True).to_dict())
    with pytest.warns(Notice):
        images = sample(tiny_run, n=2, prompts=["red", "a blue thing"], guidance=2.0, size=(16, 8),
                        output="tensor", **FAST)
    assert images.shape == (4, 3, 16, 8)


@pytest.mark.parametrize("text,size", [("64x32", (32, 64)), ("16", (16, 16)), (" 8X4 ", (4, 8)), ("-8", (-8, -8)),
                                       ("0", (0, 0))])
def test_the_command_line_size_is_width_first(text, size):
    assert parse_size(text) == size  # values are checked against the run, which knows the multiple


@pytest.mark.parametrize("text", ["64x", "x32", "", "8x8x8", "a", "8.5", "8 x"])
def test_a_malformed_command_line_size_names_the_form(text):
    with pytest.raises(UserError, match=rf"--size must be WxH in pixels \(width first, e.g. 64x32\) or N for a "
                                        rf"square, got '{text}'"):
        parse_size(text)


def test_sample_options_spell_a_size_one_way_and_record_it_only_when_asked():
    assert SampleOptions(size=16) == SampleOptions(size=(16, 16)) == SampleOptions(size=[16, 16])
    assert SampleOptions(size=(8, 24)).size == (8, 24) and DEFAULTS.size is None
    assert "size" not in DEFAULTS.job_settings()
    settings = SampleOptions(size=(8, 24)).job_settings()
    assert settings["size"] == [8, 24] and SampleOptions.from_job_settings(settings) == SampleOptions(size=(8, 24))


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`latentpatch sample ARGS` through the console entry point, in-process: (exit code, stdout, stderr)."""
    from latentpatch.cli.app import main

    monkeypatch.setattr("sys.argv", ["latentpatch", "sample", *map(str, args), "--steps", "2", "--device", "cpu",
                                     "--no-progress"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def test_the_cli_samples_at_size_wxh_end_to_end(tiny_run, tmp_path, monkeypatch, capsys):
    from PIL import Image

    out = tmp_path / "out"
    code, stdout, err = cli(monkeypatch, capsys, tiny_run, "--n", 3, "--out", out, "--size", "32x16")
    assert code == 0 and "3 images in" in stdout
    assert err == ("warning: --size 32x16: this run never trained at that shape at full size; the nearest size it "
                   "trained at is 8x8 (W x H). Sampling at 32x16 anyway\n")
    for i in range(3):
        with Image.open(out / f"{i:08d}.png") as im:
            assert im.size == (32, 16)  # PIL's (W, H)
    settings = json.loads((out / "job.json").read_text())["settings"]
    assert settings["size"] == [16, 32] and settings["latent_shape"] == [3, 16, 32]
    code, stdout, _ = cli(monkeypatch, capsys, tiny_run, "--n", 3, "--out", out, "--size", "32x16")
    assert code == 0 and "3 were there already, 0 new" in stdout
    code, _, err = cli(monkeypatch, capsys, tiny_run, "--n", 3, "--out", out, "--size", "16")
    assert code == 2 and "--size (was 32x16, now 16x16; W x H) differs" in err


CLI_BAD_SIZES = [
    ("0", "error: --size 0x0 (W x H; size=(0, 0) in Python, H first) does not fit this run: each side must be a "
          "positive multiple of 8 pixels (the autoencoder's factor 1 x the network's size multiple 8); a valid size "
          "near it is --size 8x8 (size=(8, 8))"),
    ("64x", "error: --size must be WxH in pixels (width first, e.g. 64x32) or N for a square, got '64x'"),
    ("30", "error: --size 30x30 (W x H; size=(30, 30) in Python, H first) does not fit this run: each side must be "
           "a positive multiple of 8 pixels (the autoencoder's factor 1 x the network's size multiple 8); a valid "
           "size near it is --size 32x32 (size=(32, 32))"),
    ("-8", "error: --size -8x-8 (W x H; size=(-8, -8) in Python, H first) does not fit this run"),
    ("30x16", "error: --size 30x16 (W x H; size=(16, 30) in Python, H first) does not fit this run"),
]


@pytest.mark.parametrize("size,message", CLI_BAD_SIZES, ids=[s for s, _ in CLI_BAD_SIZES])
def test_a_bad_cli_size_is_one_error_line_and_exit_2_with_nothing_written(run8, tmp_path, monkeypatch, capsys,
                                                                         size, message):
    code, _, err = cli(monkeypatch, capsys, run8, "--n", 1, "--out", tmp_path / "out", "--size", size)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_the_cli_help_says_width_first_and_the_api_height_first():
    from typer.testing import CliRunner

    from latentpatch.cli.app import app

    output = CliRunner().invoke(app, ["sample", "--help"], terminal_width=200).output
    help_text = " ".join(output.replace("\u2502", " ").split())  # rich's box sides out
    assert "--size" in help_text and "WxH (width first, e.g. 64x32) or N for N x N" in help_text
    assert "in Python size=(H, W), height first" in help_text
    assert "`size`: the images' (H, W) in pixels, height first as torch writes shapes" in sample.__doc__


def test_a_prompts_file_samples_at_any_size_from_the_cli(tiny_run, tmp_path, monkeypatch, capsys):
    from text_helpers import write_clip_config

    from latentpatch.conditioning import ConditioningSpec
    from latentpatch.text.loader import load_text_encoder

    record = load_text_encoder(str(write_clip_config(tmp_path / "clip.json")), None, device="cpu").record
    remake(tiny_run, ["model.text_dim=32", "model.pooled_text_dim=32"],
           ConditioningSpec(text_encoder=record, pooled=True).to_dict())
    (tmp_path / "p.jsonl").write_text('{"prompt": "red", "count": 2}\n{"prompt": "a blue thing"}\n')
    code, stdout, _ = cli(monkeypatch, capsys, tiny_run, "--n", 1, "--out", tmp_path / "out", "--size", "8x16",
                          "--prompts", tmp_path / "p.jsonl", "--guidance", 2)
    assert code == 0 and "3 images in" in stdout
    rows = [json.loads(line) for line in (tmp_path / "out" / "images.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["size"]) for r in rows] == [("red", [16, 8])] * 2 + [("a blue thing", [16, 8])]
