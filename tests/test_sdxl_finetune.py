"""Fine-tuning SDXL with patches: the run a StableDiffusionXLPipeline folder resolves to, its two text encoders as
encode_prompt, the first step exactly the pipeline's UNet call, exact resume, the CLI, the export that the stock
pipeline loads (whole or with the LoRA file its loader reads) and samples as `latentpatch sample` does, a short
fine-tune that learns its captions, and the SDXL-family models that are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from flow_helpers import load_pipeline
from sdxl_helpers import CLIP_WIDTHS, LATENT_CHANNELS, TIME_DIM, ZSNR_SCHEDULER, make_sdxl_pipeline
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
    """The eps base, and the same weights read as a v-prediction model of zero terminal SNR."""
    root = tmp_path_factory.mktemp("sdxl-bases")
    eps = make_sdxl_pipeline(root / "eps")
    zsnr = root / "zsnr"
    shutil.copytree(eps, zsnr)
    (zsnr / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler",
                                                                          **ZSNR_SCHEDULER}))
    return {"eps": eps, "zsnr": zsnr}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return colour_folder(tmp_path_factory.mktemp("colours") / "images", n=12, size=16)


@pytest.fixture(scope="module")
def runs(pipelines, images, tmp_path_factory):
    """A 4-step fine-tune of each base (the eps one's latents/ serve the zsnr one: the same VAE and encoders)."""
    root = tmp_path_factory.mktemp("sdxl-runs")
    eps = lp.finetune(pipelines["eps"], images, root / "eps", steps=4, resolution=16, overrides=SHORT, **FAST)
    zsnr = lp.finetune(pipelines["zsnr"], eps.latents, root / "zsnr", steps=4, overrides=SHORT, **FAST)
    return {"eps": eps, "zsnr": zsnr}


@pytest.fixture(scope="module")
def stock(pipelines):
    return load_pipeline(pipelines["eps"])  # DiffusionPipeline.from_pretrained: a StableDiffusionXLPipeline


@pytest.mark.parametrize("name", ["eps", "zsnr"])
def test_an_sdxl_pipeline_resolves_to_its_stock_unet_its_ddpm_loss_and_its_own_encoders(runs, pipelines, name):
    run = runs[name].run_dir
    cfg, info = load_config(run / "config.yaml"), json.loads((run / "run.json").read_text())
    pretrained = cfg.model.pretrained
    assert cfg.model.arch == "pretrained" and pretrained.class_name == "UNet2DConditionModel"
    assert pretrained.config["in_channels"] == LATENT_CHANNELS and pretrained.vae_scale_factor == 2  # stock, pixels
    assert cfg.edm.precond == "vp" and cfg.vp.objective == "ddpm" and cfg.vp.snr_gamma is None
    assert cfg.edm.scheduler["prediction_type"] == {"eps": "epsilon", "zsnr": "v_prediction"}[name]
    assert cfg.edm.sigma_max == pytest.approx({"eps": 14.6146, "zsnr": 4096.0}[name], rel=1e-4)  # EulerDiscrete's end
    assert cfg.patches.coordinate_scale == "per-axis"
    assert info["autoencoder"]["source"] == str(pipelines["eps"] / "vae") and info["latent_shape"] == [4, 8, 8]
    text = info["conditioning"]["text_encoder"]
    assert text["model"] == f"transformers:{pipelines[name]}" and text["padding"] == "pipeline"
    assert text["max_length"] == 77 and text["width"] == sum(CLIP_WIDTHS) and text["pooled_dim"] == CLIP_WIDTHS[1]
    assert text["empty_prompt"] == "zeros"


def test_the_text_encoders_give_encode_prompts_embeddings_and_the_pipelines_zeros_for_no_prompt(pipelines, stock):
    from latentpatch.text.loader import load_text_encoder

    encoder = load_text_encoder(f"transformers:{pipelines['eps']}", layer="last", padding="pipeline", device="cpu")
    ours = encoder.encode(["a red brick wall"])
    with torch.no_grad():
        tokens, negative, pooled, negative_pooled = stock.encode_prompt(["a red brick wall"], device="cpu")
    assert torch.equal(ours.tokens, tokens) and torch.equal(ours.pooled, pooled) and bool(ours.mask.all())
    empty = encoder.encode([""])  # guidance's unconditional input: force_zeros_for_empty_prompt
    assert torch.equal(empty.tokens, negative) and torch.equal(empty.pooled, negative_pooled)
    assert not bool(negative.any())


def test_the_first_step_starts_from_exactly_the_pipelines_unet_call(runs, pipelines, stock):
    """A crop at latent offset (2, 4) of the 8x8 latent: the UNet with the pipeline's time ids for that crop."""
    from latentpatch.conditioning import Conditioning
    from latentpatch.denoiser import build_precond
    from latentpatch.finetuning.starting_points import diffusers_base
    from latentpatch.patches import crop_coordinates

    found = diffusers_base(str(pipelines["eps"]), None, None)
    cfg = load_config(runs["eps"].run_dir / "config.yaml")
    ours = build_precond(cfg, LATENT_CHANNELS, device="cpu", init_state=found.state).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, LATENT_CHANNELS, 4, 4, generator=g)
    cond = Conditioning(text_tokens=torch.randn(2, 77, sum(CLIP_WIDTHS), generator=g),
                        text_pooled=torch.randn(2, CLIP_WIDTHS[1], generator=g))
    coords = crop_coordinates(torch.tensor([2, 2]), torch.tensor([4, 4]), 4, 4, 8, 8)
    t = torch.tensor([999.0, 10.0])
    time_ids = stock._get_add_time_ids((16, 16), (4, 8), (8, 8), torch.float32,
                                       text_encoder_projection_dim=CLIP_WIDTHS[1]).expand(2, 6)
    with torch.no_grad():
        got = ours.net(torch.cat([x, coords], 1), t, cond)
        want = stock.unet(x, t, cond.text_tokens, added_cond_kwargs={"text_embeds": cond.text_pooled,
                                                                     "time_ids": time_ids}).sample
    assert torch.equal(got, want)


def test_an_sdxl_fine_tune_stopped_and_resumed_equals_an_uninterrupted_one(runs, pipelines, tmp_path):
    store = runs["eps"].latents
    whole = lp.finetune(pipelines["eps"], store, tmp_path / "whole", steps=4, overrides=SHORT, **FAST)
    lp.finetune(pipelines["eps"], store, tmp_path / "split", steps=2, overrides=SHORT, **FAST)
    resumed = lp.finetune(pipelines["eps"], store, tmp_path / "split", steps=4, resume=True, **FAST)
    assert resumed.step == 4
    assert_same_weights(whole.checkpoint, resumed.checkpoint)


def test_the_cli_fine_tunes_an_sdxl_pipeline_and_samples_it(pipelines, images, tmp_path):
    from latentpatch.cli.app import app

    out = tmp_path / "ft"
    done = CliRunner().invoke(app, ["train", "--base", str(pipelines["eps"]), "--data", str(images), "--out",
                                    str(out), "--max-steps", "2", "--device", "cpu", "--no-progress", *SHORT])
    assert done.exit_code == 0, done.output
    sampled = CliRunner().invoke(app, ["sample", str(out), "--prompt", "red", "--n", "1", "--steps", "2",
                                       "--out", str(tmp_path / "s"), "--device", "cpu", "--no-progress"])
    assert sampled.exit_code == 0, sampled.output
    assert (tmp_path / "s" / "00000000.png").is_file()


def _same_image(run, pipe, sampler, guidance=2.0):
    """latentpatch sample's image and the pipeline's for the same initial noise and prompt, within 1/255."""
    from latentpatch.diffusion.samplers import per_image_noise_fn
    from latentpatch.seeding import image_seed

    ours = lp.sample(run, prompts=["red"], n=1, steps=3, sampler=sampler, guidance=guidance, output="tensor",
                     device="cpu")
    noise = per_image_noise_fn([image_seed(0, 0)], device="cpu")(torch.empty(1, LATENT_CHANNELS, 8, 8))
    with torch.no_grad():
        theirs = pipe(prompt=["red"], height=16, width=16, latents=noise, num_inference_steps=3,
                      guidance_scale=guidance, output_type="pt").images
    assert torch.allclose(ours, (theirs.float() * 255).round() / 255, atol=1.01 / 255)


@pytest.mark.parametrize("name,sampler", [("eps", "heun"), ("zsnr", "euler")])
def test_the_export_is_the_stock_sdxl_pipeline_and_samples_as_latentpatch_does(runs, tmp_path, name, sampler):
    """StableDiffusionXLPipeline.from_pretrained(OUT), no remote code; its scheduler takes latentpatch's steps, so
    for the same initial noise and prompt (guidance with SDXL's zero unconditional input) it gives sample's image."""
    from diffusers import StableDiffusionXLPipeline

    out = lp.export(runs[name].run_dir, tmp_path / "export", sampler=sampler)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert not (out / "pipeline_latentpatch.py").exists()
    assert "StableDiffusionXLPipeline.from_pretrained" in (out / "README.md").read_text()
    pipe = StableDiffusionXLPipeline.from_pretrained(out, dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == LATENT_CHANNELS
    _same_image(runs[name].run_dir, pipe, sampler)


def test_a_run_widened_by_coordinate_channels_samples_as_its_base_then_trains_but_never_exports(runs, images,
                                                                                                 tmp_path):
    """The "channels" arm of benchmarks/finetune/sdxl_channels.py: the run with conv_in widened by two zero inputs
    gives its base's images, fine-tunes on (the coordinate weights move), and its export is refused in one line,
    leaving no folder."""
    from benchmarks.finetune.experiment import widened_copy

    wide = widened_copy(runs["eps"].run_dir, tmp_path / "wide", "net.unet.conv_in.weight")
    settings = dict(prompts=["red"], n=2, steps=2, sampler="euler", guidance=2.0, seed=3, output="tensor", device="cpu")
    assert torch.equal(lp.sample(wide, **settings), lp.sample(runs["eps"].run_dir, **settings))
    tuned = lp.finetune(wide, runs["eps"].latents, tmp_path / "tuned", steps=2, overrides=SHORT, **FAST)
    net = lp.load_run(tuned.run_dir, weights="raw").precond.net
    assert net.coordinate_inputs == 2 and net.unet.conv_in.weight[:, LATENT_CHANNELS:].abs().max() > 0
    with pytest.raises(UserError, match="reads coordinate channels .* only stock SDXL fine-tunes export"):
        lp.export(tuned.run_dir, tmp_path / "exports" / "export")
    assert not (tmp_path / "exports").exists()  # refused before anything is written, its parent folder too


@pytest.mark.parametrize("mode", ["separate", "merged"])
def test_a_lora_fine_tune_trains_adapters_only_and_exports_for_the_sdxl_loader(pipelines, runs, tmp_path, mode):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    run = lp.finetune(pipelines["eps"], runs["eps"].latents, tmp_path / "ft", steps=3, lora_rank=2, lr=1e-2,
                      overrides=SHORT, **FAST)
    base = UNet2DConditionModel.from_pretrained(pipelines["eps"], subfolder="unet").state_dict()
    assert_adapters_only(run.checkpoint, base, "net.unet.")
    out = lp.export(run.run_dir, tmp_path / "export", lora=mode, sampler="euler")
    pipe = StableDiffusionXLPipeline.from_pretrained(out, dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    if mode == "separate":
        assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
        pipe.load_lora_weights(out / "lora")
    _same_image(run.run_dir, pipe, "euler")


def test_a_short_sdxl_fine_tune_learns_its_captions(pipelines, tmp_path):
    """The prompt-colour test of the text path, on SDXL's objective, time ids and encoders: the tiny UNet starts
    from random weights, so its captions are learnt from scratch; samples for each colour land nearest that
    colour's latents (chance: 6 of 18)."""
    colours = colour_folder(tmp_path / "images", n=24, size=16)
    run = lp.finetune(pipelines["eps"], colours, tmp_path / "ft", steps=200, lr=3e-3, batch_size=8,
                      overrides=["train.log_every=10", "train.ema_halflife_kimg=0.05", "optim.warmup_steps=10",
                                 "heldout.share=0"], **FAST)
    assert colour_hits(run) >= 11


def _variant(pipeline, root, unet=None, scheduler=None, index=None):
    """A copy of the pipeline folder with its unet config, scheduler config or model_index changed."""
    shutil.copytree(pipeline, root)
    for name, change in (("unet/config.json", unet), ("scheduler/scheduler_config.json", scheduler),
                         ("model_index.json", index)):
        if change:
            path = root / name
            path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    return root


@pytest.mark.parametrize("change,message", [
    (dict(unet={"in_channels": 9}), r"takes 9 input channels for 4-channel latents \(an inpainting"),
    (dict(unet={"time_cond_proj_dim": 256}), r"takes a guidance embedding \(time_cond_proj_dim: an LCM-distilled"),
    (dict(index={"_class_name": "StableDiffusionXLImg2ImgPipeline"}),
     r"is a StableDiffusionXLImg2ImgPipeline; latentpatch fine-tunes the text-to-image StableDiffusionXLPipeline"),
    (dict(scheduler={"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_min": 0.002, "sigma_max": 80.0,
                     "sigma_data": 0.5}), r"is an SDXL UNet trained in EDM's formulation \(EDMDPMSolverMultistep"),
])
def test_the_sdxl_models_not_served_are_refused_in_one_line(pipelines, images, tmp_path, change, message):
    base = _variant(pipelines["eps"], tmp_path / "base", **change)
    with pytest.raises(UserError, match=message) as refused:
        lp.finetune(base, images, tmp_path / "ft", steps=1, **FAST)
    assert "\n" not in str(refused.value) and not (tmp_path / "ft").exists()


def test_another_text_encoder_or_coordinate_scale_is_refused_in_one_line(pipelines, images, tmp_path):
    with pytest.raises(UserError, match=r"^SDXL is conditioned on its pipeline's own two text encoders"):
        lp.finetune(pipelines["eps"], images, tmp_path / "a", steps=1, text_encoder="ViT-B-32", **FAST)
    with pytest.raises(UserError, match=r"^an SDXL base reads each crop's offset and its image's size from per-axis"):
        lp.finetune(pipelines["eps"], images, tmp_path / "b", steps=1, resolution=16,
                    overrides=["patches.coordinate_scale=longer-side"], **FAST)


def test_an_sdxl_fine_tune_on_aspect_buckets_gives_each_crop_its_own_images_size(pipelines, tmp_path, monkeypatch):
    """Through the trainer: every UNet call of a bucketed fine-tune gets time ids whose original_size is one of the
    buckets' (in pixels), whose crop lies inside it and whose target_size is the crop's; the run samples another
    shape with the pipeline's full-size defaults."""
    from helpers import photo, save_image

    from latentpatch.models.sdxl import SDXLNetwork

    folder = tmp_path / "shapes"
    folder.mkdir()
    for i, size in enumerate([(24, 12), (12, 24), (16, 16)] * 3):  # W x H: landscape, portrait, square
        save_image(photo(i % 5, size), folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(["red", "green", "blue"][i % 3])
    seen = []
    time_ids = SDXLNetwork.time_ids
    monkeypatch.setattr(SDXLNetwork, "time_ids", lambda self, c, d: seen.append(time_ids(self, c, d)) or seen[-1])
    run = lp.finetune(pipelines["eps"], folder, tmp_path / "ft", steps=3, resolution=16, buckets=True,
                      overrides=[*SHORT, "patches.sizes=[0.5]"], **FAST)
    info = json.loads((run.run_dir / "run.json").read_text())
    buckets = {(2 * h, 2 * w) for h, w in info["buckets"]}  # latent (h, w) x the tiny VAE's 2 pixels
    assert buckets == {(12, 20), (16, 16), (20, 12)}
    ids = torch.cat(seen)
    sizes = {tuple(r) for r in ids[:, :2].long().tolist()}
    assert len(sizes) >= 2 and sizes <= buckets
    assert bool((ids[:, 2:4] + ids[:, 4:6] <= ids[:, :2]).all())  # each crop inside its own image
    seen.clear()
    lp.sample(run, prompts=["red"], n=1, steps=1, sampler="euler", size=(12, 20), output="tensor", device="cpu")
    assert seen and all(torch.equal(t, torch.tensor([[12.0, 20.0, 0, 0, 12.0, 20.0]]).expand_as(t)) for t in seen)


def test_buckets_alone_take_a_step_the_unet_divides_into(tmp_path):
    """A UNet of three levels takes latent sides in multiples of 4: `buckets=True` without a step encodes buckets
    of sides in steps of 4 latent pixels (8 px through the tiny VAE), where the default step (2 latent pixels)
    would be refused before training, after encoding."""
    from diffusers import UNet2DConditionModel
    from helpers import photo, save_image

    from latentpatch.data.store import LatentStore

    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, block_out_channels=(8, 16, 16),
        layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 4),
        cross_attention_dim=sum(CLIP_WIDTHS), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=6 * TIME_DIM + CLIP_WIDTHS[1])
    base = make_sdxl_pipeline(tmp_path / "three-levels", unet=unet)
    folder = tmp_path / "shapes"
    folder.mkdir()
    for i, size in enumerate([(40, 24), (24, 40), (32, 32)] * 2):  # W x H
        save_image(photo(i % 5, size), folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(["red", "green", "blue"][i % 3])
    run = lp.finetune(base, folder, tmp_path / "ft", steps=1, resolution=32, buckets=True, overrides=SHORT, **FAST)
    store = LatentStore(run.latents)
    assert store.manifest.bucket_step == 8  # 4 latent pixels x the VAE's 2
    assert {tuple(s) for s in store.manifest.buckets} == {(24, 40), (32, 32), (40, 24)}
    assert all(h % 4 == 0 and w % 4 == 0 for _, h, w in store.bucket_latent_shapes)
