"""A DiT fine-tune whose transformer stayed stock exports to diffusers' own DiTPipeline: `DiTPipeline.from_pretrained`
loads it without remote code, and its images are latentpatch's sampler over the pipeline scheduler's own noise
levels (DDIM = euler, DPM-Solver++(2M) = dpmpp_2m), within 1/255 per pixel. What DiTPipeline cannot reproduce (a
class count other than its null label's 1000, heun) goes to the coordinate pipeline or is refused."""

import json

import pytest
import torch
from export_helpers import finetune_run, generators, pixels
from pretrained_helpers import make_dit_pipeline

import latentpatch as lp
from latentpatch.errors import UserError
from latentpatch.exporting.dit_pipeline import pipeline_sigmas
from latentpatch.runs import load_run

STEPS, SEED = 5, 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit1000")
    return finetune_run(root / "run", make_dit_pipeline(root / "pipeline", num_classes=1000))


def latentpatch_images(run, scheduler, labels, guidance, sampler):
    """latentpatch's own sampler over the scheduler's noise levels from the pipeline's starting noise (image i:
    its generator's N(0, I), scaled to EDM's x), decoded by the run's autoencoder: 8-bit [N, 3, H, W]."""
    from latentpatch.conditioning.requested import request_conditioning
    from latentpatch.diffusion.guidance import guided_denoiser
    from latentpatch.diffusion.samplers import get_sampler
    from latentpatch.patches import full_coordinates
    from latentpatch.sampling.generate import load_autoencoder_for
    from latentpatch.sampling.job_folder import to_uint8

    loaded = load_run(run)
    c, h, w = loaded.info["latent_shape"]
    sigmas, start = pipeline_sigmas(scheduler, STEPS)
    noise = torch.stack([torch.randn([c, h, w], generator=g) for g in generators(SEED, len(labels))])
    cond, uncond = request_conditioning(loaded.spec, None, None, labels)
    denoise = guided_denoiser(loaded.precond, full_coordinates(len(labels), h, w), cond, uncond, guidance)
    latents = get_sampler(sampler)(denoise, noise.double() * start, sigmas).float()
    return to_uint8(load_autoencoder_for(loaded, "cpu").decode(latents)).float()


@pytest.mark.parametrize("sampler,scheduler", [("euler", "DDIMScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_a_stock_dit_fine_tune_loads_in_dit_pipeline_and_gives_latentpatchs_images(run, tmp_path, sampler, scheduler):
    from diffusers import DiTPipeline

    out = lp.export(run, tmp_path / "out", sampler=None if sampler == "euler" else sampler)  # euler: the default
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["scheduler"] == ["diffusers", scheduler]
    assert not (out / "pipeline_latentpatch.py").exists() and index["id2label"]["3"] == "3"
    pipe = DiTPipeline.from_pretrained(out)  # the stock class, no remote code
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.in_channels == 4 and type(pipe.transformer.pos_embed.proj) is torch.nn.Conv2d
    labels, guidance = [3, 998], 4.0
    theirs = pipe(class_labels=labels, guidance_scale=guidance, num_inference_steps=STEPS,
                  generator=generators(SEED, 2), output_type="np").images
    ours = latentpatch_images(run, pipe.scheduler, labels, guidance, sampler)
    assert float(ours.std()) > 5  # real images, not a constant
    assert float((pixels(theirs) - ours).abs().max()) <= 1
    unguided = pipe(class_labels=labels, guidance_scale=1.0, num_inference_steps=STEPS,
                    generator=generators(SEED, 2), output_type="np").images
    assert float((pixels(unguided) - latentpatch_images(run, pipe.scheduler, labels, 1.0, sampler)).abs().max()) <= 1
    assert float((pixels(unguided) - pixels(theirs)).abs().max()) > 10  # guidance changed them: it was compared


def test_the_dit_pipeline_folder_says_how_to_load_it_and_refuses_heun(run, tmp_path):
    out = lp.export(run, tmp_path / "out")
    card, record = (out / "README.md").read_text(), json.loads((out / "export.json").read_text())
    assert 'DiTPipeline.from_pretrained("' in card and "trust_remote_code" not in card
    assert record["pipeline"] == "DiTPipeline" and record["sampler"] == "euler"
    assert record["base"].startswith("fine-tune of") and "the base's own VP (epsilon)" in card
    with pytest.raises(UserError, match="--sampler heun: DiTPipeline starts from unit noise"):
        lp.export(run, tmp_path / "heun", sampler="heun")
    assert not (tmp_path / "heun").exists()


def test_the_cli_names_the_stock_loader(run, tmp_path):
    from typer.testing import CliRunner

    from latentpatch.cli.app import app

    done = CliRunner().invoke(app, ["export", str(run), str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    assert "DiTTransformer2DModel + DDIMScheduler" in done.output and "DiTPipeline.from_pretrained(" in done.output
