"""Pretrained diffusers bases start exactly from the pretrained denoiser: the pipeline's own preconditioning,
DiT positions from the coordinate channels, sampling as the pipelines' schedulers sample, Stable Diffusion's
text features. Tiny models built from the diffusers / transformers / open_clip classes, saved as folders.

Tolerances: a comparison that is not bitwise is float32 rounding of the same math done in another order
(x_t / sqrt(a_t) * 1/sqrt(1 + sigma^2) is not x_t bit for bit), so it is stated relative to the size of the
values compared: 1e-6 of their largest magnitude, about 8 float32 ulps.
"""

import json

import pytest
import torch
from pretrained_helpers import make_dit_pipeline, make_sd_pipeline, with_prediction_type

from latentpatch.conditioning import Conditioning
from latentpatch.denoiser import build_precond
from latentpatch.diffusion.vp import schedule_sigmas
from latentpatch.finetuning.starting_points import diffusers_base, load_choice
from latentpatch.patches import crop_coordinates, full_coordinates

ULPS = 1e-6  # relative tolerance of float32 reorderings (see the module docstring)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    pytest.importorskip("transformers")  # the pipeline's text encoder (the optional `transformers` extra)
    return make_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.fixture(scope="module")
def sd_v(sd, tmp_path_factory):
    return with_prediction_type(sd, tmp_path_factory.mktemp("sd_v") / "pipeline", "v_prediction")


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    return make_dit_pipeline(tmp_path_factory.mktemp("dit") / "pipeline")


def wrapped(root):
    """The fine-tune's starting denoiser, built as lp.finetune builds it (widened network, its own precond)."""
    found = diffusers_base(str(root), None, None)
    cfg = found.cfg
    cfg.edm.sigma_data, cfg.model.attention = 1.0, "sdpa"
    if found.class_name == "UNet2DConditionModel":
        cfg.model.text_dim = 32
    return build_precond(cfg, 4, device="cpu", init_state=found.state).eval(), found


def close(ours, theirs, scale):
    return float((ours - theirs).abs().max()) <= ULPS * float(scale)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_the_wrapped_unet_is_the_pipelines_x0_prediction_at_its_timesteps(kind, sd, sd_v):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    root = sd if kind == "epsilon" else sd_v
    precond, found = wrapped(root)
    assert found.cfg.edm.precond == "vp" and precond.prediction_type == kind
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet").eval()
    scheduler = DDPMScheduler.from_config(found.cfg.edm.scheduler, clip_sample=False)
    sigmas = schedule_sigmas(found.cfg.edm.scheduler)
    seen = {}
    precond.net.register_forward_hook(lambda m, args, out: seen.update(x=args[0], t=args[1]))
    g = torch.Generator().manual_seed(0)
    x0, noise, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), \
        torch.randn(2, 77, 32, generator=g)
    cond = Conditioning(text_tokens=text, text_mask=torch.ones(2, 77, dtype=torch.bool))
    for t in [0, 1, 10, 250, 500, 998, 999]:
        x_t = scheduler.add_noise(x0, noise, torch.tensor([t, t]))
        with torch.no_grad():
            out = unet(x_t, torch.tensor([t, t]), encoder_hidden_states=text).sample
            x0_diffusers = torch.cat([scheduler.step(out[i : i + 1], t, x_t[i : i + 1]).pred_original_sample
                                      for i in range(2)])
            x = x_t / scheduler.alphas_cumprod[t].sqrt()  # the same noisy latent in EDM's variable
            D = precond(x, sigmas[t].expand(2), full_coordinates(2, 8, 8), cond)
        assert seen["t"].tolist() == [float(t)] * 2  # the discrete timestep itself, not an approximation
        assert close(seen["x"][:, :4], x_t, x_t.abs().max())  # the network's input is x_t (to rounding)
        assert torch.equal(seen["x"][:, 4:], full_coordinates(2, 8, 8))
        assert close(D, x0_diffusers, x.abs().max()), (t, float((D - x0_diffusers).abs().max()))


def test_the_wrapped_dit_is_diffusers_dit_bit_for_bit_and_its_x0_prediction(dit):
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    precond, found = wrapped(dit)
    assert found.cfg.model.num_classes == 10 and found.cfg.text.model == "none"
    transformer = DiTTransformer2DModel.from_pretrained(dit, subfolder="transformer").eval()
    ours_state, theirs_state = precond.net.transformer.state_dict(), transformer.state_dict()
    assert found.cfg.model.pretrained.config["in_channels"] == 4 and precond.net.coordinate_inputs == 0  # stock
    assert type(precond.net.transformer.pos_embed.proj) is torch.nn.Conv2d
    assert all(torch.equal(ours_state[k], theirs_state[k]) for k in theirs_state) and ours_state.keys() == theirs_state.keys()
    g = torch.Generator().manual_seed(0)
    x, t, labels = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0.0, 10.0, 700.0]), torch.tensor([3, 9, 10])
    with torch.no_grad():  # label 10 is the null class, what guidance's unconditional half uses
        ours = precond.net(torch.cat([x, full_coordinates(3, 8, 8)], 1), t, Conditioning(class_labels=labels))
        theirs = transformer(x, timestep=t.long(), class_labels=labels).sample[:, :4]  # learned sigma: the mean
    assert torch.equal(ours, theirs)
    scheduler = DDPMScheduler.from_config(found.cfg.edm.scheduler, clip_sample=False)
    sigmas = schedule_sigmas(found.cfg.edm.scheduler)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    cond = Conditioning(class_labels=torch.tensor([3]))
    for step in [0, 100, 500, 999]:
        x_t = scheduler.add_noise(x0, noise, torch.tensor([step]))
        with torch.no_grad():
            eps = transformer(x_t, timestep=torch.tensor([step]), class_labels=torch.tensor([3])).sample[:, :4]
            x0_diffusers = scheduler.step(eps, step, x_t).pred_original_sample
            x = x_t / scheduler.alphas_cumprod[step].sqrt()
            D = precond(x, sigmas[step], full_coordinates(1, 8, 8), cond)
        assert close(D, x0_diffusers, x.abs().max()), (step, float((D - x0_diffusers).abs().max()))


def test_on_an_aligned_crop_the_stock_dit_is_diffusers_dit_with_the_crops_slice_of_the_table(dit):
    from diffusers import DiTTransformer2DModel

    precond, _ = wrapped(dit)
    transformer = DiTTransformer2DModel.from_pretrained(dit, subfolder="transformer").eval()
    full = transformer.pos_embed.pos_embed.reshape(4, 4, -1)  # the 8 x 8 latent's 4 x 4 tokens
    x, t, labels = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([5.0, 600.0]), \
        torch.tensor([1, 10])
    tops, lefts = torch.tensor([2, 4]), torch.tensor([4, 0])  # latent pixels, on the token grid
    coords = crop_coordinates(tops, lefts, 4, 4, 8, 8)
    for i, (top, left) in enumerate(zip(tops.tolist(), lefts.tolist())):  # one at a time: same batch, same kernels
        one = slice(i, i + 1)
        embed = transformer.pos_embed  # diffusers uses its buffer as is when the size is its own
        embed.height = embed.width = 2
        embed.pos_embed = full[top // 2: top // 2 + 2, left // 2: left // 2 + 2].reshape(1, 4, -1)
        with torch.no_grad():
            ours = precond.net(torch.cat([x[one], coords[one]], 1), t[one], Conditioning(class_labels=labels[one]))
            theirs = transformer(x[one], timestep=t[one].long(), class_labels=labels[one]).sample
        assert torch.equal(ours, theirs[:, :4])


@pytest.mark.parametrize("widened", [False, True])
def test_a_dit_fine_tuned_with_coordinate_channels_before_still_computes_the_pretrained_dit(dit, widened):
    """Runs fine-tuned before DiT bases stayed stock hold a patch embedding widened by two coordinate inputs
    (config in_channels C+2); their network builds from that config, and with zero coordinate weights it is the
    pretrained DiT bit for bit, as the stock one is."""
    from pretrained_helpers import widen_dit_base

    found = diffusers_base(str(dit), None, None)
    if widened:
        widen_dit_base(found)
    found.cfg.edm.sigma_data, found.cfg.model.attention = 1.0, "sdpa"
    net = build_precond(found.cfg, 4, device="cpu", init_state=found.state).eval().net
    assert net.coordinate_inputs == (2 if widened else 0)
    assert net.transformer.pos_embed.proj.weight.shape[1] == (6 if widened else 4)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([3.0, 900.0])
    with torch.no_grad():
        out = net(torch.cat([x, full_coordinates(2, 8, 8)], 1), t, Conditioning(class_labels=torch.tensor([0, 10])))
    stock, _ = wrapped(dit)
    with torch.no_grad():
        ref = stock.net(torch.cat([x, full_coordinates(2, 8, 8)], 1), t, Conditioning(class_labels=torch.tensor([0, 10])))
    assert torch.equal(out, ref)


def test_dit_positions_are_the_pretrained_table_at_full_size_and_its_slice_for_an_aligned_crop(dit):
    from diffusers import DiTTransformer2DModel
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from latentpatch.models.pretrained_dit import coordinate_pos_embed

    embed = DiTTransformer2DModel.from_pretrained(dit, subfolder="transformer").pos_embed
    base, scale = embed.base_size, embed.interpolation_scale
    native = coordinate_pos_embed(full_coordinates(2, 8, 8), 16, 2, base, scale)
    assert torch.equal(native, embed.pos_embed.expand(2, -1, -1))  # the model's own buffer, bit for bit
    for h, w in [(12, 16), (16, 16)]:  # other full sizes: the table diffusers computes at that size
        table = get_2d_sincos_pos_embed(16, (h // 2, w // 2), base_size=base, interpolation_scale=scale).float()
        assert torch.equal(coordinate_pos_embed(full_coordinates(1, h, w), 16, 2, base, scale)[0], table)
        grid = table.reshape(h // 2, w // 2, 16)
        tops, lefts = torch.tensor([2, 4]), torch.tensor([6, 0])  # aligned: multiples of the patch size 2
        crops = coordinate_pos_embed(crop_coordinates(tops, lefts, 4, 6, h, w), 16, 2, base, scale)
        assert torch.equal(crops[0], grid[1:3, 3:6].reshape(-1, 16))
        assert torch.equal(crops[1], grid[2:4, 0:3].reshape(-1, 16))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_euler_sampling_matches_the_stable_diffusion_pipeline(kind, sd, sd_v):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from latentpatch.sampling.latents import generate_latents

    root = sd if kind == "epsilon" else sd_v
    precond, found = wrapped(root)
    encoder = load_choice(found.text_choice, "cpu")  # the pipeline's own CLIPTextModel, through transformers
    emb = encoder.encode(["red"])
    pipe = StableDiffusionPipeline.from_pretrained(root, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True,
                                                        timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    prompt_embeds, _ = pipe.encode_prompt("red", "cpu", 1, False)
    assert torch.equal(emb.tokens, prompt_embeds) and emb.mask.all()  # all 77 positions, padded with EOT
    seed, steps = 7, 6
    noise = torch.randn([4, 8, 8], generator=torch.Generator().manual_seed(seed))[None]
    theirs = pipe(prompt="red", num_inference_steps=steps, guidance_scale=1.0, latents=noise,
                  output_type="latent").images
    ours = generate_latents(precond, [seed], [4, 8, 8], Conditioning(text_tokens=emb.tokens, text_mask=emb.mask),
                            sampler="euler", steps=steps, sigma_min=found.cfg.edm.sigma_min,
                            sigma_max=found.cfg.edm.sigma_max)
    assert close(ours, theirs, theirs.abs().max()), float((ours - theirs).abs().max())


def test_euler_over_ddims_noise_levels_is_the_dit_pipelines_ddim(dit):
    from diffusers import DiTPipeline
    from latentpatch.autoencoders import load_autoencoder

    from latentpatch.diffusion.samplers import sample_euler

    precond, found = wrapped(dit)
    pipe = DiTPipeline.from_pretrained(dit)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[2], guidance_scale=1.0, generator=torch.Generator().manual_seed(5),
                  num_inference_steps=5, output_type="pt").images
    sigmas = schedule_sigmas(found.cfg.edm.scheduler)[pipe.scheduler.timesteps].double()  # DDIM's, then 0 (alpha 1)
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    noise = torch.randn([1, 4, 8, 8], generator=torch.Generator().manual_seed(5)).double()
    x = noise * (1 + sigmas[0] ** 2).sqrt()  # DDIM starts at x_T = noise: x_T / sqrt(a_T) in EDM's variable
    cond, coords = Conditioning(class_labels=torch.tensor([2])), full_coordinates(1, 8, 8)
    latents = sample_euler(lambda x_, s: precond(x_, s, coords, cond), x, sigmas).float()
    ours = (load_autoencoder(dit).decode(latents) / 2 + 0.5).clamp(0, 1)  # the pipeline's vae/, our decode
    assert close(ours, images, 1.0), float((ours - images).abs().max())


# Stable Diffusion's text features. SD 1.x (ldm FrozenCLIPEmbedder): CLIP's last layer after the final norm,
# prompts padded with end-of-text; SD 2.x (ldm FrozenOpenCLIPEmbedder, layer="penultimate"): every block but
# the last, then the final norm, padded with 0. Both pipelines let the UNet attend to all 77 positions.
SD_FEATURES = [("last", "eot", True), ("penultimate", "zero", False)]


def tiny_tower(tmp_path, quick_gelu):
    from text_helpers import TINY_CLIP

    path = tmp_path / f"tiny-clip-{'quick' if quick_gelu else 'gelu'}.json"
    path.write_text(json.dumps({**TINY_CLIP, "quick_gelu": quick_gelu}))
    return path


def reference_features(clip, tokenizer, texts, layer, padding):
    """The SD embedders' own steps, written out: embed, positions, the blocks, ln_final."""
    ids = tokenizer(texts, context_length=77)
    if padding == "eot":
        after = torch.cumsum(ids == tokenizer.eot_token_id, 1) - (ids == tokenizer.eot_token_id).int() > 0
        ids = torch.where(after, torch.full_like(ids, tokenizer.eot_token_id), ids)
    x = clip.token_embedding(ids) + clip.positional_embedding
    tower = clip.transformer
    blocks = tower.resblocks[:-1] if layer == "penultimate" else tower.resblocks
    x = x if tower.batch_first else x.permute(1, 0, 2)
    for block in blocks:
        x = block(x, attn_mask=clip.attn_mask)
    x = x if tower.batch_first else x.permute(1, 0, 2)
    return clip.ln_final(x)


@pytest.mark.parametrize("layer,padding,quick_gelu", SD_FEATURES)
def test_text_features_are_the_layer_norm_and_padding_stable_diffusion_uses(layer, padding, quick_gelu, tmp_path):
    from latentpatch.text.loader import load_text_encoder

    encoder = load_text_encoder(str(tiny_tower(tmp_path, quick_gelu)), None, layer=layer, padding=padding)
    texts = ["a red brick wall", ""]
    emb = encoder.encode(texts)
    with torch.no_grad():
        expected = reference_features(encoder.model, encoder.tokenizer, texts, layer, padding)
    assert torch.equal(emb.tokens, expected) and emb.mask.all()
    assert encoder.record["layer"] == layer and encoder.record["padding"] == padding
    default = load_text_encoder(str(tiny_tower(tmp_path, quick_gelu)), None).encode(texts)
    assert default.mask.sum(1).tolist() == [6, 2]  # the default masks the padding, as before


@pytest.mark.parametrize("layer,padding,quick_gelu", SD_FEATURES)
def test_the_open_clip_tower_gives_what_the_pipelines_converted_text_encoder_gives(layer, padding, quick_gelu,
                                                                                   tmp_path):
    """SD 2.x's text_encoder/ is OpenCLIP ViT-H/14 converted to CLIPTextModel without its last block, read at
    its last layer; SD 1.x's is OpenAI CLIP ViT-L/14 itself. The open_clip fallback must match either."""
    pytest.importorskip("transformers")
    from pretrained_helpers import clip_text_model_from_open_clip, write_clip_tokenizer

    from latentpatch.text.loader import load_text_encoder

    clip_json = tiny_tower(tmp_path, quick_gelu)
    ours = load_text_encoder(str(clip_json), None, layer=layer, padding=padding)
    blocks = len(ours.model.transformer.resblocks) - (layer == "penultimate")
    pipeline = tmp_path / "pipeline"
    clip_text_model_from_open_clip(ours.model, blocks, "quick_gelu" if quick_gelu else "gelu").save_pretrained(
        pipeline / "text_encoder")
    write_clip_tokenizer(tmp_path / "bpe", pad_token="<|endoftext|>" if padding == "eot" else "!").save_pretrained(
        pipeline / "tokenizer")
    theirs = load_text_encoder(f"transformers:{pipeline}", None, padding=padding)  # last_hidden_state, as SD
    texts = ["a red brick wall", "", "blue"]
    a, b = ours.encode(texts), theirs.encode(texts)
    assert close(a.tokens, b.tokens, b.tokens.abs().max()) and torch.equal(a.mask, b.mask)
