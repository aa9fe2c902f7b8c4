"""`lp.export`: for every kind of run latentpatch trains, the exported diffusers pipeline, loaded with
`DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)`, gives the image `lp.sample` gives for the same
seed and settings (within 1/255 per pixel), and the same latents (float32 rounding: the scheduler integrates in
float32 where latentpatch integrates in float64, and guides the network output F where latentpatch guides
D = c_skip x + c_out F: the same numbers up to rounding)."""

from dataclasses import dataclass

import pytest
import torch
from export_helpers import (dit_run, finetune_run, generators, load_export, pixels, reference_latents,
                            text_encoder_record, unet_run)
from pretrained_helpers import make_dit_pipeline, make_sd_pipeline, tiny_vae
from text_helpers import write_clip_config

import latentpatch as lp
from latentpatch.runs import load_run
from latentpatch.seeding import image_seed

STEPS, SEED = 4, 3


@dataclass
class Reference:
    """What latentpatch makes for a request: `lp.sample`'s 8-bit images and its latents, image i from the
    generator seeded with image_seed(SEED, i)."""

    call: dict  # the same request in the pipeline's words
    count: int
    images: torch.Tensor  # [N, 3, H, W] in [0, 1], 8-bit
    latents: torch.Tensor


def reference(run, n=2, *, prompts=None, class_labels=None, guidance=1.0, size=None, sampler="heun"):
    count = n * len(prompts or class_labels or [None])
    loaded = load_run(run)  # once: its text encoder serves both
    images = lp.sample(loaded, n, prompts=prompts, class_labels=class_labels, steps=STEPS, guidance=guidance,
                       seed=SEED, size=size, sampler=sampler, output="tensor")
    per_image = lambda xs: None if xs is None else [x for x in xs for _ in range(n)]  # noqa: E731
    latents = reference_latents(loaded, [image_seed(SEED, i) for i in range(count)], prompts=per_image(prompts),
                                class_labels=per_image(class_labels), size=size, sampler=sampler, steps=STEPS,
                                guidance=guidance)
    assert images.shape[0] == count and float(images.std()) > 0.02  # real images, not a constant
    call = dict(prompt=prompts, class_labels=class_labels, num_images_per_prompt=n, num_inference_steps=STEPS,
                guidance_scale=guidance, height=None if size is None else size[0],
                width=None if size is None else size[1])
    return Reference(call, count, images, latents)


def assert_same(pipe, ref):
    """The pipeline gives the reference's images (within 1/255) and latents (1e-4 of their size); its images."""
    images = pipe(**ref.call, generator=generators(SEED, ref.count), output_type="np").images
    assert float((pixels(images) - ref.images * 255).abs().max()) <= 1
    latents = pipe(**ref.call, generator=generators(SEED, ref.count), output_type="latent").images
    assert float((latents - ref.latents).abs().max()) <= 1e-4 * float(ref.latents.abs().max())
    return images


def same_images(run, pipe, n=2, **request):
    return assert_same(pipe, reference(run, n, **request))


@pytest.fixture(scope="module")
def clip_json(tmp_path_factory):
    return write_clip_config(tmp_path_factory.mktemp("clip") / "tiny-clip.json")


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "vae"
    tiny_vae().save_pretrained(folder)
    return folder


def export_of(run, tmp_path, **kw):
    return load_export(lp.export(run, tmp_path / "export", **kw))


def test_an_unconditional_dit_gives_the_images_sample_gives(tmp_path):
    run = dit_run(tmp_path / "run")
    pipe = export_of(run, tmp_path)
    assert type(pipe.transformer).__name__ == "LatentPatchDiT" and type(pipe.scheduler).__name__ == "EDMHeunScheduler"
    assert pipe.vae is None  # a pixel-space run: the latents are the pixels
    same_images(run, pipe, n=3)


def test_a_class_conditional_dit_gives_the_images_sample_gives_with_guidance(tmp_path):
    run = dit_run(tmp_path / "run", num_classes=3)
    same_images(run, export_of(run, tmp_path), class_labels=[2, 0], guidance=2.5)


def test_a_text_dit_gives_the_images_sample_gives_through_its_converted_open_clip_tower(tmp_path, clip_json):
    run = dit_run(tmp_path / "run", num_classes=2, text=text_encoder_record(clip_json))  # prompts: the null label
    pipe = export_of(run, tmp_path)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModelWithProjection"
    assert pipe.config.text_pooled and pipe.config.text_padding == "masked"
    same_images(run, pipe, n=1, prompts=["red", "a blue brick wall"], guidance=3.0)


def test_a_unet_trained_here_gives_the_images_sample_gives_through_its_vae(tmp_path, clip_json, vae_folder):
    run = unet_run(tmp_path / "run", vae_folder, text=text_encoder_record(clip_json, layer="penultimate",
                                                                          padding="zero"))
    pipe = export_of(run, tmp_path)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.unet.config.in_channels == 6
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    same_images(run, pipe, n=1, prompts=["green"], guidance=2.0)


def test_a_class_unet_trained_here_gives_the_images_sample_gives(tmp_path, vae_folder):
    run = unet_run(tmp_path / "run", vae_folder, num_classes=2)
    pipe = export_of(run, tmp_path)
    assert type(pipe.unet).__name__ == "UNet2DModel"
    same_images(run, pipe, n=2, class_labels=[1], guidance=0.0)  # guidance 0: the unconditional model alone


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    pytest.importorskip("transformers")
    return make_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")


def test_a_stable_diffusion_fine_tune_gives_the_images_sample_gives(tmp_path, sd):
    run = finetune_run(tmp_path / "run", sd)
    pipe = export_of(run, tmp_path)
    assert type(pipe.scheduler).__name__ == "HeunDiscreteScheduler" and pipe.config.text_padding == "eot"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"  # the pipeline's own, as it was
    same_images(run, pipe, n=1, prompts=["red"], guidance=2.0)


def test_a_dit_fine_tune_of_other_than_1000_classes_gives_the_images_sample_gives_in_the_custom_pipeline(tmp_path):
    run = finetune_run(tmp_path / "run", make_dit_pipeline(tmp_path / "dit"))  # 10 classes: DiTPipeline's null
    pipe = export_of(run, tmp_path)  # label is 1000, so the coordinate pipeline serves it (tests/test_export_dit.py)
    assert type(pipe.transformer).__name__ == "DiTTransformer2DModel" and pipe.transformer.config.in_channels == 4
    assert pipe.config.coordinate_channels == 0  # stock: its positions from its own table, no grid appended
    same_images(run, pipe, n=1, class_labels=[3, 7], guidance=4.0)
    same_images(run, pipe, n=1, class_labels=[2], size=(24, 24))  # another (square) size: the table diffusers computes


def test_a_dit_fine_tuned_with_coordinate_channels_before_still_samples_and_exports_them(tmp_path):
    run = finetune_run(tmp_path / "run", make_dit_pipeline(tmp_path / "dit"), widened=True)
    assert load_run(run).precond.net.coordinate_inputs == 2
    pipe = export_of(run, tmp_path)
    assert pipe.transformer.config.in_channels == 6 and pipe.config.coordinate_channels == 2  # stock class, 4 + 2
    same_images(run, pipe, n=1, class_labels=[3, 7], guidance=4.0)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_edm_euler_and_dpm_solver_export_the_stock_schedulers_and_the_same_images(tmp_path, sampler):
    run = dit_run(tmp_path / "run", num_classes=2)
    pipe = export_of(run, tmp_path, sampler=sampler)
    assert type(pipe.scheduler).__module__.startswith("diffusers.schedulers")
    same_images(run, pipe, class_labels=[1], guidance=1.5, sampler=sampler)


def test_a_fine_tune_exports_euler_as_euler_discrete(tmp_path):
    run = finetune_run(tmp_path / "run", make_dit_pipeline(tmp_path / "dit"))
    pipe = export_of(run, tmp_path, sampler="euler")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    same_images(run, pipe, n=1, class_labels=[5], guidance=2.0, sampler="euler")


def test_the_pipeline_reads_the_runs_coordinate_scale_at_a_non_square_size(tmp_path):
    wide = (8, 16)  # (H, W) pixels of a run trained on 8 x 8
    longer = dit_run(tmp_path / "longer", overrides=("patches.coordinate_scale=longer-side",))
    per_axis = dit_run(tmp_path / "per_axis")
    a = same_images(longer, load_export(lp.export(longer, tmp_path / "a")), size=wide)
    b = same_images(per_axis, load_export(lp.export(per_axis, tmp_path / "b")), size=wide)
    assert float(abs(a - b).max()) > 0.01  # the same weights, another grid: other images


def test_a_lora_fine_tune_exports_merged_or_as_a_lora_file_with_the_same_images(tmp_path, sd):
    run = finetune_run(tmp_path / "run", sd, lora_rank=2)
    ref = reference(run, 1, prompts=["red"], guidance=2.0)
    merged = lp.export(run, tmp_path / "merged", lora="merged")
    assert not (merged / "lora").exists()
    assert_same(load_export(merged), ref)
    separate = lp.export(run, tmp_path / "separate")  # the default for a UNet2DConditionModel
    assert (separate / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = load_export(separate)
    base = pipe(**ref.call, generator=generators(SEED, 1), output_type="latent").images
    assert float((base - ref.latents).abs().max()) > 0.1  # without its adapters: the base, not the fine-tune
    pipe.load_lora_weights(separate / "lora")
    assert_same(pipe, ref)
