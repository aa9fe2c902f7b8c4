"""Fine-tuning the flow-matching bases (SD3 / SD3.5, FLUX.1) with patches: the run the pipeline folder resolves
to, the first step exactly the stock denoiser, the noise-level shift of the full image for every crop, exact
resume, the CLI, and the export that the stock pipeline loads and samples as `latentpatch sample` does."""

from __future__ import annotations

import json

import pytest
import torch
from flow_helpers import LATENT_CHANNELS, make_flux_pipeline, make_sd3_pipeline
from text_helpers import colour_folder, colour_hits
from trainer_helpers import assert_adapters_only, assert_same_weights
from typer.testing import CliRunner

import latentpatch as lp
from latentpatch.config import load_config
from latentpatch.errors import UserError

pytest.importorskip("transformers")
FAST = dict(device="cpu", progress=False)
SHORT = ["train.batch_size=4", "train.log_every=2", "heldout.share=0"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-bases")
    return {"sd3": make_sd3_pipeline(root / "sd3"), "flux": make_flux_pipeline(root / "flux")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return colour_folder(tmp_path_factory.mktemp("colours") / "images", n=12, size=16)


@pytest.fixture(scope="module")
def runs(pipelines, images, tmp_path_factory):
    """A 4-step fine-tune of each base (encoded once into its run's latents/)."""
    root = tmp_path_factory.mktemp("flow-runs")
    return {name: lp.finetune(pipelines[name], images, root / name, steps=4, resolution=16, overrides=SHORT, **FAST)
            for name in ("sd3", "flux")}


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_flow_pipeline_resolves_to_its_own_objective_schedule_encoders_and_stock_transformer(runs, pipelines, name):
    run = runs[name].run_dir
    cfg, info = load_config(run / "config.yaml"), json.loads((run / "run.json").read_text())
    klass = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}[name]
    assert cfg.model.arch == "pretrained" and cfg.model.pretrained.class_name == klass
    assert cfg.model.pretrained.config["in_channels"] in (LATENT_CHANNELS, 4 * LATENT_CHANNELS)  # stock: no channels
    assert cfg.edm.precond == "flow" and cfg.edm.scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert cfg.flow.weighting_scheme == ("logit_normal" if name == "sd3" else "none")  # each example's default
    assert cfg.patches.aligned and cfg.patches.coordinate_scale == "per-axis"
    assert info["autoencoder"]["source"] == str(pipelines[name] / "vae") and info["latent_shape"][0] == 16
    text = info["conditioning"]["text_encoder"]
    assert text["model"] == f"transformers:{pipelines[name]}" and text["padding"] == "pipeline"
    assert text["max_length"] == {"sd3": 256, "flux": 512}[name]  # the pipelines' own T5 lengths


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_the_first_step_starts_from_exactly_the_stock_denoiser(runs, pipelines, name):
    from latentpatch.conditioning import Conditioning
    from latentpatch.denoiser import build_precond
    from latentpatch.finetuning.starting_points import diffusers_base
    from latentpatch.models.flow_base import load_flow_base
    from latentpatch.patches import full_coordinates

    found = diffusers_base(str(pipelines[name]), None, None)
    cfg = load_config(runs[name].run_dir / "config.yaml")
    ours = build_precond(cfg, LATENT_CHANNELS, device="cpu", init_state=found.state).eval()
    stock = load_flow_base(pipelines[name]).precond
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, LATENT_CHANNELS, 8, 8, generator=g) * 2
    width = cfg.model.pretrained.config["joint_attention_dim"]
    cond = Conditioning(text_tokens=torch.randn(2, 5, width, generator=g),
                        text_pooled=torch.randn(2, cfg.model.pretrained.config["pooled_projection_dim"], generator=g))
    sigma, coords = torch.tensor([0.3, 4.0]), full_coordinates(2, 8, 8)
    with torch.no_grad():
        assert torch.equal(ours(x, sigma, coords, cond), stock(x, sigma, coords, cond))


def test_every_crop_of_a_flux_step_takes_the_shift_of_its_full_images_tokens():
    """A crop's noise level is drawn as a full-size image's: FLUX's shift reads the full latent's token count."""
    from flow_helpers import FLUX_SCHEDULER

    from latentpatch.conditioning import ConditioningSpec
    from latentpatch.diffusion.flow import FLUX_DEFAULTS, FlowMatching
    from latentpatch.patches import PatchStage
    from latentpatch.seeding import make_generator
    from latentpatch.training.batches import BatchSpec, draw_batch
    from latentpatch.training.rows import TrainingRows

    objective = FlowMatching(FLUX_DEFAULTS, FLUX_SCHEDULER)
    latents = {"mean": torch.zeros(6, 16, 32, 32)}
    rows = TrainingRows.split([latents], torch.zeros(6, dtype=torch.long), {}, None, (32, 32))
    spec = BatchSpec(seed=3, objective=objective, conditioning=ConditioningSpec(), label_dropout=0.0,
                     caption_dropout=0.0, crop_multiple=2)
    crop = draw_batch(rows, spec, PatchStage(8, 8, 1.0, 4), 4, 0, 0, 0, 1, torch.device("cpu"))
    g = make_generator(torch.device("cpu"), 3, 0, 0, "batch")
    torch.randint(0, 13, (4,), generator=g), torch.randint(0, 13, (4,), generator=g)  # the crop offsets' draws
    full = objective.draw_sigmas(4, g, "cpu", torch.tensor([[32, 32]] * 4))
    assert torch.equal(crop.sigma, full)
    assert not torch.equal(full, objective.draw_sigmas(4, make_generator(torch.device("cpu"), 3, 0, 0, "batch"),
                                                       "cpu", torch.tensor([[8, 8]] * 4)))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_flow_fine_tune_stopped_and_resumed_equals_an_uninterrupted_one(pipelines, images, tmp_path, name):
    whole = lp.finetune(pipelines[name], images, tmp_path / "whole", steps=4, resolution=16, overrides=SHORT, **FAST)
    store = whole.latents  # the same store: the split run encodes nothing
    lp.finetune(pipelines[name], store, tmp_path / "split", steps=2, resolution=16, overrides=SHORT, **FAST)
    resumed = lp.finetune(pipelines[name], store, tmp_path / "split", steps=4, resume=True, **FAST)
    assert resumed.step == 4
    assert_same_weights(whole.checkpoint, resumed.checkpoint)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_two_gloo_processes_continue_a_flow_fine_tune_as_one_process_does(pipelines, runs, tmp_path, name):
    """The last 2 of the 4 steps on 2 processes (torchrun, each half the batch) reach the weights one process
    reached: the noise levels, noise and crops of the global batch are drawn the same way on any world size."""
    import os
    import subprocess
    import sys

    split = tmp_path / "split"
    lp.finetune(pipelines[name], runs[name].latents, split, steps=2, resolution=16, overrides=SHORT, **FAST)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "latentpatch.cli", "train", "--base", str(pipelines[name]), "--data", str(runs[name].latents), "--out",
           str(split), "--resume", "--max-steps", "4", "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(runs[name].checkpoint, split / "checkpoints" / "step-00000004", atol=1e-6)
    with pytest.raises(AssertionError):  # the two steps moved the weights by far more than that tolerance
        assert_same_weights(split / "checkpoints" / "step-00000002", split / "checkpoints" / "step-00000004",
                            atol=1e-4)
    log = [json.loads(line) for line in (split / "log.jsonl").read_text().splitlines()]
    whole = [json.loads(line) for line in (runs[name].run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [r["step"] for r in whole] == [2, 4]
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in whole], rel=1e-5)


def test_the_cli_fine_tunes_an_sd3_pipeline_and_samples_it(pipelines, images, tmp_path):
    from latentpatch.cli.app import app

    out = tmp_path / "ft"
    done = CliRunner().invoke(app, ["train", "--base", str(pipelines["sd3"]), "--data", str(images), "--out", str(out),
                                    "--max-steps", "2", "--device", "cpu", "--no-progress", *SHORT])
    assert done.exit_code == 0, done.output
    sampled = CliRunner().invoke(app, ["sample", str(out), "--prompt", "red", "--n", "1", "--steps", "2",
                                       "--sampler", "euler", "--out", str(tmp_path / "s"), "--device", "cpu",
                                       "--no-progress"])
    assert sampled.exit_code == 0, sampled.output
    assert (tmp_path / "s" / "00000000.png").is_file()


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_the_export_is_the_stock_pipeline_and_samples_as_latentpatch_does(runs, tmp_path, name):
    """StableDiffusion3Pipeline / FluxPipeline.from_pretrained(OUT) with no remote code; for the same initial noise
    and prompt, latentpatch's Euler over the pipeline's schedule gives its image (within 1/255)."""
    import diffusers
    from diffusers import FluxPipeline

    from latentpatch.diffusion.samplers import per_image_noise_fn
    from latentpatch.seeding import image_seed

    out = lp.export(runs[name].run_dir, tmp_path / "export")
    klass = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[name]
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == klass
    assert not (out / "pipeline_latentpatch.py").exists() and f"{klass}.from_pretrained" in (out / "README.md").read_text()
    cache_call = json.loads((out / "export.json").read_text())["cache_call"]  # FluxPipeline's own step cache
    assert (cache_call is None) == (name == "sd3") and (cache_call is None or cache_call in (out / "README.md").read_text())
    pipe = getattr(diffusers, klass).from_pretrained(out, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    guidance = 3.5 if name == "flux" else 2.0
    ours = lp.sample(runs[name].run_dir, prompts=["red"], n=1, steps=3, sampler="euler", guidance=guidance,
                     output="tensor", device="cpu")
    noise = per_image_noise_fn([image_seed(0, 0)], device="cpu")(torch.empty(1, LATENT_CHANNELS, 8, 8))
    latents = FluxPipeline._pack_latents(noise, 1, LATENT_CHANNELS, 8, 8) if name == "flux" else noise
    with torch.no_grad():
        theirs = pipe(prompt=["red"], height=16, width=16, latents=latents, num_inference_steps=3,
                      guidance_scale=guidance, output_type="pt").images
    assert torch.allclose(ours, (theirs.float() * 255).round() / 255, atol=1.01 / 255)


def test_the_cli_export_names_the_stock_loader(runs, tmp_path):
    from latentpatch.cli.app import app

    done = CliRunner().invoke(app, ["export", str(runs["sd3"].run_dir), str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    assert f'StableDiffusion3Pipeline.from_pretrained("{tmp_path / "out"}")' in done.output
    assert "trust_remote_code" not in done.output


def test_a_sana_style_transformer_is_refused_in_one_line(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SanaTransformer2DModel"}))
    with pytest.raises(UserError, match=r"^.* holds a SanaTransformer2DModel, whose transformer has no position "):
        lp.finetune(tmp_path, tmp_path, tmp_path / "ft", steps=1, **FAST)


@pytest.mark.parametrize("mode", ["separate", "merged"])
def test_a_lora_fine_tune_trains_adapters_only_and_exports_for_the_stock_loader(pipelines, runs, tmp_path, mode):
    """LoRA on the SD3 transformer's attention: the base stays stock (nothing widened trains); exported separate,
    the stock pipeline's load_lora_weights reads the file and samples what latentpatch samples."""
    from diffusers import StableDiffusion3Pipeline

    from latentpatch.diffusion.samplers import per_image_noise_fn
    from latentpatch.seeding import image_seed

    run = lp.finetune(pipelines["sd3"], runs["sd3"].latents, tmp_path / "ft", steps=3, lora_rank=2, lr=1e-2,
                      overrides=SHORT, **FAST)
    from diffusers import SD3Transformer2DModel

    stock = SD3Transformer2DModel.from_pretrained(pipelines["sd3"], subfolder="transformer").state_dict()
    assert_adapters_only(run.checkpoint, stock, "net.transformer.")
    out = lp.export(run.run_dir, tmp_path / "export", lora=mode)
    pipe = StableDiffusion3Pipeline.from_pretrained(out, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if mode == "separate":
        assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
        pipe.load_lora_weights(out / "lora")
    ours = lp.sample(run.run_dir, prompts=["red"], n=1, steps=3, sampler="euler", guidance=2.0, output="tensor",
                     device="cpu")
    noise = per_image_noise_fn([image_seed(0, 0)], device="cpu")(torch.empty(1, LATENT_CHANNELS, 8, 8))
    with torch.no_grad():
        theirs = pipe(prompt=["red"], height=16, width=16, latents=noise, num_inference_steps=3, guidance_scale=2.0,
                      output_type="pt").images
    assert torch.allclose(ours, (theirs.float() * 255).round() / 255, atol=1.01 / 255)


def test_a_short_sd3_fine_tune_learns_its_captions(pipelines, tmp_path):
    """The prompt-colour test of the text path, on SD3's objective and encoders: the tiny transformer starts from
    random weights, so its captions are learnt from scratch in 300 steps; samples for each colour land nearest
    that colour's latents (chance: 6 of 18)."""
    colours = colour_folder(tmp_path / "images", n=24, size=16)
    run = lp.finetune(pipelines["sd3"], colours, tmp_path / "ft", steps=300, lr=3e-3, batch_size=8,
                      overrides=["train.log_every=10", "train.ema_halflife_kimg=0.05", "optim.warmup_steps=10",
                                 "heldout.share=0"], **FAST)
    assert colour_hits(run) >= 11


@pytest.mark.slow
def test_a_flux_fine_tune_learns_its_captions(tmp_path):
    """The prompt-colour test on FLUX's objective and encoders (~250 CPU-s: `pytest -m slow`). Schnell-style (no
    distilled guidance input, so sampling guides with two calls; FLUX.1-dev's guidance input gave at most 9 of 18
    at 300 steps), its VAE scaled as SD3's test VAE is (1.5305): with FLUX's 0.3611 the tiny VAE's colour latents
    have a std of 0.12 and 300 steps learn the data but not the captions (8 of 18). Chance: 6 of 18."""
    pipe = make_flux_pipeline(tmp_path / "flux", guidance_embeds=False, scaling_factor=1.5305)
    colours = colour_folder(tmp_path / "images", n=24, size=16)
    run = lp.finetune(pipe, colours, tmp_path / "ft", steps=600, lr=3e-3, batch_size=8, resolution=16,
                      overrides=["train.log_every=10", "train.ema_halflife_kimg=0.05", "optim.warmup_steps=10",
                                 "heldout.share=0"], **FAST)
    assert colour_hits(run, guidance=4.0) >= 11


def test_an_sd3_fine_tune_on_aspect_buckets_trains_and_samples_another_shape(pipelines, tmp_path):
    """Each image's own full latent on the token grid (its own window of the position table), a crop step mixing
    shapes, and a sample at a shape of the buckets."""
    from helpers import photo, save_image

    folder = tmp_path / "shapes"
    folder.mkdir()
    for i, size in enumerate([(24, 12), (12, 24), (16, 16)] * 3):  # W x H: landscape, portrait, square
        save_image(photo(i % 5, size), folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(["red", "green", "blue"][i % 3])
    run = lp.finetune(pipelines["sd3"], folder, tmp_path / "ft", steps=3, resolution=16, buckets=True,
                      overrides=[*SHORT, "patches.sizes=[0.5]"], **FAST)
    info = json.loads((run.run_dir / "run.json").read_text())
    assert len(info["buckets"]) == 3
    images = lp.sample(run, prompts=["red"], n=1, steps=2, sampler="euler", size=(12, 20), output="tensor",
                       device="cpu")
    assert images.shape == (1, 3, 12, 20)
