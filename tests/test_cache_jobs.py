"""`--cache` in jobs: off is the sampler as it was; on, it works with guidance, every sampler, --size and the
pretrained bases, is cleared between batches, is recorded in job.json and each PNG, resumes, and bad settings
are one error line (latentpatch.sampling.caches through lp.sample, `sample` and `eval`)."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import TINY_UNET, finetune_run, write_run
from helpers import make_image_folder, run_main
from pretrained_helpers import make_dit_pipeline, make_sd_pipeline
from tiny_runs import make_tiny_run
from trainer_helpers import assert_within_one_level

from latentpatch.conditioning import ConditioningSpec
from latentpatch.config import load_config
from latentpatch.errors import UserError
from latentpatch.sampling import job_folder
from latentpatch.sampling.generate import sample
from latentpatch.sampling.options import SampleOptions

FAST = dict(steps=4, device="cpu", output="tensor")
RAS = "ras:ratio=0.5,interval=4,warmup=2"


@pytest.fixture(scope="module")
def unet_class_run(tmp_path_factory):
    cfg = load_config(None, TINY_UNET + ["model.num_classes=3"])
    spec = ConditioningSpec(3, ("a", "b", "c"))
    return write_run(tmp_path_factory.mktemp("unet") / "run", cfg, [3, 8, 8], spec=spec)


def test_cache_off_is_no_option_in_the_job_file_and_none_or_off_mean_off():
    assert SampleOptions(cache="none").cache is None and SampleOptions(cache=" Off ").cache is None
    assert "cache" not in SampleOptions(cache="none").job_settings()
    assert SampleOptions(cache="ras").cache == RAS == SampleOptions(cache="ras:interval=4, ratio=.5").cache
    assert SampleOptions(cache="step:order=0").job_settings()["cache"] == "step:interval=3,order=0,warmup=3"


@pytest.mark.parametrize("sampler", ["heun", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("run,cache", [("tiny_class_run", "step"), ("tiny_class_run", "ras"),
                                       ("unet_class_run", "deepcache")])
def test_with_guidance_and_every_sampler_interval_1_gives_the_uncached_images_and_the_default_other_ones(
        run, cache, sampler, request):
    run = request.getfixturevalue(run)
    kw = dict(n=2, class_labels=[0, 2], guidance=2.5, sampler=sampler, **FAST)
    plain = sample(run, **kw)
    assert torch.equal(sample(run, cache=f"{cache}:interval=1", **kw), plain)
    cached = sample(run, cache=cache, **kw)
    assert cached.shape == plain.shape and not torch.equal(cached, plain)


@pytest.mark.parametrize("cache", ["step", RAS, "step:order=0,warmup=1"])
def test_another_size_samples_with_a_cache(tiny_class_run, cache):
    kw = dict(n=1, class_labels=[1], size=(8, 12), **FAST)
    plain = sample(tiny_class_run, **kw)
    assert torch.equal(sample(tiny_class_run, cache=cache.split(":")[0] + ":interval=1", **kw), plain)
    assert sample(tiny_class_run, cache=cache, **kw).shape == (1, 3, 8, 12)


@pytest.mark.parametrize("run,cache", [("tiny_class_run", "step"), ("tiny_class_run", RAS),
                                       ("tiny_class_run", "step:order=2,interval=3,warmup=2"),
                                       ("unet_class_run", "deepcache:interval=2")])
def test_an_image_is_the_same_alone_first_or_second_and_in_batches_of_any_size(run, cache, request):
    # Batch k + 1 starts from a cleared cache: image 1 sampled after image 0 in its own batch, or beside it, or
    # alone in a job of one (seed 7's image 1 is image_seed(7, 1); n=1 with a seed gives image_seed(seed, 0)).
    run = request.getfixturevalue(run)
    kw = dict(class_labels=[2], guidance=2.0, cache=cache, **FAST)
    one_by_one = sample(run, n=3, batch_size=1, seed=7, **kw)
    together = sample(run, n=3, batch_size=3, seed=7, **kw)
    two_and_one = sample(run, n=3, batch_size=2, seed=7, **kw)
    # what is left is float32 GEMM rounding, which follows the batch shape (test_generate: same without a cache);
    # the images are 8-bit, so a rounding on either side of a level's edge moves a rare pixel by one level
    assert_within_one_level(one_by_one, together)
    assert_within_one_level(two_and_one, together)
    torch.testing.assert_close(sample(run, n=1, seed=7, batch_size=1, **kw)[0], one_by_one[0], rtol=0, atol=0)


@pytest.fixture(scope="module")
def dit_xl_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return finetune_run(root / "run", make_dit_pipeline(root / "pipeline"))


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("sd")
    return finetune_run(root / "run", make_sd_pipeline(root / "pipeline"))


@pytest.mark.parametrize("run,caches,refused,kw", [
    ("dit_xl_run", ("step", "ras"), "deepcache", dict(class_labels=[3], guidance=4.0)),
    ("sd_run", ("deepcache",), "ras", dict(prompts=["red"], guidance=2.0))])
def test_the_pretrained_bases_take_their_caches(run, caches, refused, kw, request):
    run = request.getfixturevalue(run)
    kw = dict(n=1, **kw, **FAST)
    plain = sample(run, **kw)
    for cache in caches:
        assert torch.equal(sample(run, cache=f"{cache}:interval=1", **kw), plain)
        assert not torch.equal(sample(run, cache=cache, **kw), plain)
    with pytest.raises(UserError, match=rf"^--cache {refused} is for (DiTs|UNets); this run's network is "):
        sample(run, cache=refused, **kw)


def test_the_cache_is_recorded_in_the_job_and_each_png_and_the_job_resumes_with_it(tiny_class_run, tmp_path):
    out = tmp_path / "out"
    kw = dict(n=3, class_labels=[1], steps=4, batch_size=2, device="cpu", out=out, output="none")
    sample(tiny_class_run, cache="ras", **kw)
    job = json.loads((out / "job.json").read_text())
    assert job["settings"]["cache"] == RAS and SampleOptions.from_job_settings(job["settings"]).cache == RAS
    assert list(job["settings"])[list(job["settings"]).index("seed") + 1] == "cache"
    assert job_folder.read_png_meta(out / "00000002.png")["cache"] == RAS
    made = (out / "00000002.png").read_bytes()
    (out / "00000002.png").unlink()
    again = sample(tiny_class_run, cache="ras:ratio=0.5", **kw)  # the same cache, spelt otherwise
    assert (again.written, again.skipped) == (1, 2) and (out / "00000002.png").read_bytes() == made
    with pytest.raises(UserError, match=r"cache \(was 'ras:ratio=0.5,interval=4,warmup=2', now 'step:"):
        sample(tiny_class_run, cache="step", **kw)
    with pytest.raises(UserError, match=r"cache \(was 'ras:.*', now None\)"):
        sample(tiny_class_run, **kw)


@pytest.mark.parametrize("cache,message", [
    ("fast", r"^--cache: unknown method 'fast'; the methods are step, deepcache, ras \(e.g. --cache "
             r"ras:ratio=0.5,interval=4\), or none$"),
    ("ras:ratio=0", r"^--cache ras: ratio must be a number > 0 and <= 1, got '0'$"),
    ("ras:ratio=1.5", r"^--cache ras: ratio must be a number > 0 and <= 1, got '1.5'$"),
    ("ras:warmup=1", r"^--cache ras: warmup must be a whole number >= 2, got '1'$"),
    ("step:interval=0", r"^--cache step: interval must be a whole number >= 1, got '0'$"),
    ("step:interval=2.5", r"^--cache step: interval must be a whole number >= 1, got '2.5'$"),
    ("step:order=3", r"^--cache step: order must be a whole number >= 0 and <= 2, got '3'$"),
    ("step:depth=2", r"^--cache step: 'depth=2' is not a setting; step takes interval=, order=, warmup= "
                     r"\(defaults: interval=3,order=1,warmup=3\)$"),
    ("ras:ratio", r"^--cache ras: 'ratio' is not a setting"),
    ("", r"^--cache must be a method name \(step, deepcache, ras\) with optional settings, got ''$"),
    ("deepcache", r"^--cache deepcache is for UNets; this run's network is this project's DiT: use --cache step "
                  r"or ras$"),
])
def test_bad_cache_settings_are_refused_in_one_line_before_a_file_is_written(tiny_class_run, tmp_path, cache,
                                                                             message):
    with pytest.raises(UserError, match=message):
        sample(tiny_class_run, n=1, class_labels=[0], cache=cache, out=tmp_path / "o", **FAST)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_the_sample_and_eval_commands_take_the_cache_flag(tmp_path, monkeypatch, capsys):
    tiny_run = make_tiny_run(tmp_path / "run", side=16)  # SWD takes 16 px and more
    out = tmp_path / "out"
    code, stdout, _ = run_main(monkeypatch, capsys, "sample", tiny_run, "--n", 2, "--out", out, "--steps", 3,
                               "--cache", "step:order=0", "--device", "cpu", "--no-progress")
    assert code == 0 and "2 new here" in stdout
    assert json.loads((out / "job.json").read_text())["settings"]["cache"] == "step:interval=3,order=0,warmup=3"
    ref = tmp_path / "ref"
    make_image_folder(ref, 4, 16, formats=("png",))
    code, stdout, _ = run_main(monkeypatch, capsys, "eval", tiny_run, "--n", 2, "--ref", ref, "--metrics", "swd",
                               "--steps", 3, "--cache", "ras", "--device", "cpu", "--no-progress")
    assert code == 0
    folder = tiny_run / "eval" / "step-00000001-ema-n2-seed0-heun3-ras-ratio0.5-interval4-warmup2"
    report = json.loads((folder / "eval-report.json").read_text())
    assert report["inputs"]["generation"]["cache"] == RAS
    code, _, err = run_main(monkeypatch, capsys, "sample", tiny_run, "--n", 1, "--out", tmp_path / "bad",
                            "--cache", "ras:ratio=2", "--device", "cpu")
    assert code == 2 and err == "error: --cache ras: ratio must be a number > 0 and <= 1, got '2'\n"
