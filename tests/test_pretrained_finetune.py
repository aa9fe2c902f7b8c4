"""Fine-tuning pretrained diffusers bases: what a pipeline base resolves to and records, a tiny fine-tune of
each kind learns its captions or labels and samples, LoRA on each, the train/sample CLI, and the config.

The learning tests start from random weights (nothing can be downloaded), so the "pretrained" network knows
nothing yet and is trained from scratch in a few hundred CPU steps; two settings make that possible without
changing what is tested (that the fine-tune learns the condition through the base's own preconditioning):
the UNet is a v-prediction one (SD 2.x 768-v style) because a random epsilon network's D = x - sigma*eps
amplifies its errors by sigma (up to 14.6) far longer than a test can train, and its prompts attend to their
own tokens only (text.padding=masked) because a random UNet has not learned, as SD has, to read a prompt
spread over 77 end-of-text-padded positions. The epsilon path and SD's padding are verified exactly against
diffusers in tests/test_pretrained.py.
"""

import json
import shutil

import pytest
import torch
from pretrained_helpers import labelled_colour_folder, make_pixel_dit_pipeline, make_pixel_sd_pipeline, make_sd_pipeline
from text_helpers import colour_folder
from typer.testing import CliRunner

import latentpatch as lp
from latentpatch.config import load_config
from latentpatch.errors import UserError
from latentpatch.runs import load_run

FAST = dict(device="cpu", progress=False)
QUICK = ["train.log_every=20", "train.ema_halflife_kimg=0.05", "optim.warmup_steps=10",
         "heldout.share=0"]  # the learning curves of a fixed run length: no held-out share, no early stop


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    pytest.importorskip("transformers")  # the pipeline's text encoder (the optional `transformers` extra)
    return make_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.fixture(scope="module")
def pixel_sd(tmp_path_factory):
    pytest.importorskip("transformers")
    return make_pixel_sd_pipeline(tmp_path_factory.mktemp("pixel_sd") / "pipeline")


@pytest.fixture(scope="module")
def pixel_dit(tmp_path_factory):
    return make_pixel_dit_pipeline(tmp_path_factory.mktemp("pixel_dit") / "pipeline")


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return colour_folder(tmp_path_factory.mktemp("colours") / "images", n=24, size=8)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return labelled_colour_folder(tmp_path_factory.mktemp("labelled") / "images", n=24, size=8)


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_pipeline_base_trains_with_its_own_parts_and_the_cli_samples_it(sd, tmp_path):
    from latentpatch.cli.app import app

    from latentpatch.diffusion.vp import sigma_range

    images = colour_folder(tmp_path / "images", n=6, size=16)
    out = tmp_path / "ft"
    result = CliRunner().invoke(app, ["train", "--base", str(sd), "--data", str(images), "--out", str(out),
                                      "--max-steps", "2", "--device", "cpu", "--no-progress", "train.batch_size=4"])
    assert result.exit_code == 0, result.output
    cfg, info = load_config(out / "config.yaml"), json.loads((out / "run.json").read_text())
    assert info["autoencoder"]["source"] == str(sd / "vae") and info["resolution"] == [16, 16]  # vae/, its size
    assert cfg.edm.precond == "vp" and cfg.edm.scheduler["_class_name"] == "PNDMScheduler"
    assert (cfg.edm.sigma_min, cfg.edm.sigma_max) == sigma_range(cfg.edm.scheduler)  # all of SD's noise levels
    assert sigma_range(cfg.edm.scheduler) == pytest.approx((0.02917, 14.61), rel=1e-3)
    text = info["conditioning"]["text_encoder"]
    assert text["library"] == "transformers" and text["model"] == f"transformers:{sd}" and text["padding"] == "eot"
    assert json.loads((out / "finetune.json").read_text())["text_encoder"]["why"].startswith("the pipeline's own")
    sampled = CliRunner().invoke(app, ["sample", str(out), "--prompt", "red", "--n", "1", "--steps", "2",
                                       "--out", str(tmp_path / "samples"), "--device", "cpu", "--no-progress"])
    assert sampled.exit_code == 0, sampled.output
    assert (tmp_path / "samples" / "00000000.png").is_file()


def test_a_pipeline_unet_fine_tune_learns_its_captions_and_samples(pixel_sd, colours, tmp_path):
    run = lp.finetune(pixel_sd, colours, tmp_path / "ft", vae="pixel", resolution=8, steps=250, lr=3e-3,
                      batch_size=8, overrides=[*QUICK, "text.padding=masked"], **FAST)
    curve = losses(tmp_path / "ft")
    assert sum(curve[-3:]) < 0.6 * sum(curve[:3])
    assert load_run(run).cfg.edm.scheduler["prediction_type"] == "v_prediction"
    out = lp.sample(run, n=6, prompts=["red", "green", "blue"], guidance=2.0, steps=12, output="tensor", device="cpu")
    dominant = out.mean((2, 3)).argmax(1)  # pixel "latents": channel 0 is red, 1 green, 2 blue
    assert int((dominant == torch.arange(3).repeat_interleave(6)).sum()) >= 14  # of 18; chance is 6


def test_a_dit_fine_tune_learns_its_labels_and_samples(pixel_dit, labelled, tmp_path):
    run = lp.finetune(pixel_dit, labelled, tmp_path / "ft", vae="pixel", resolution=8, steps=200, lr=3e-3,
                      batch_size=8, overrides=QUICK, **FAST)
    curve = losses(tmp_path / "ft")
    assert sum(curve[-3:]) < 0.6 * sum(curve[:3])
    loaded = load_run(run)
    assert loaded.spec.num_classes == 10 and loaded.spec.class_names[:4] == ("blue", "green", "red", "3")
    assert loaded.cfg.edm.scheduler["prediction_type"] == "epsilon"  # DiT-XL/2's own: learned sigma, eps
    assert loaded.cfg.patches.aligned  # crops on its token grid, where its position table was trained
    assert loaded.cfg.model.pretrained.config["in_channels"] == 3 and loaded.precond.net.coordinate_inputs == 0
    out = lp.sample(run, n=6, class_labels=[0, 1, 2], guidance=4.0, steps=12, output="tensor", device="cpu")
    dominant = out.mean((2, 3)).argmax(1)  # folders sorted: blue=0, green=1, red=2 -> channels 2, 1, 0
    # of 18; chance is 6. Seeds 0-6 of this run gave 13-18 (16.6 on average) for the stock DiT, 17-18 when it was
    # fine-tuned with coordinate channels: a random network learning colours, not what the channels measured on a
    # pretrained base (docs/benchmarks.md, DiT bases)
    assert int((dominant == torch.tensor([2, 1, 0]).repeat_interleave(6)).sum()) >= 12


def test_a_stock_dit_fine_tune_stopped_and_resumed_equals_the_uninterrupted_one(pixel_dit, labelled, tmp_path):
    from safetensors.torch import load_file

    kw = dict(vae="pixel", resolution=8, lr=3e-3, batch_size=4, overrides=[*QUICK, "train.ckpt_every=3"], **FAST)
    lp.finetune(pixel_dit, labelled, tmp_path / "whole", steps=6, **kw)
    lp.finetune(pixel_dit, labelled, tmp_path / "split", steps=3, **kw)
    lp.finetune(pixel_dit, labelled, tmp_path / "split", steps=6, resume=True, **kw)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoints" / "step-00000006" / name) for run in ("whole", "split"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["net.transformer.pos_embed.proj.weight"].shape[1] == 3  # stock: the latent's channels only
    start = load_file(tmp_path / "split" / "checkpoints" / "step-00000003" / "model.safetensors")
    assert not torch.equal(start["net.transformer.pos_embed.proj.weight"], a["net.transformer.pos_embed.proj.weight"])


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_lora_trains_adapters_and_the_widened_input_only_and_samples_merged(kind, pixel_sd, pixel_dit, colours,
                                                                            labelled, tmp_path):
    from latentpatch.denoiser import build_precond

    # the UNet's conv_in gained the coordinate channels; the DiT stays stock, so its adapters alone train
    base, data, prefix = (pixel_sd, colours, "unet.conv_in.") if kind == "unet" else (pixel_dit, labelled, None)
    run = lp.finetune(base, data, tmp_path / "ft", vae="pixel", resolution=8, steps=2, lr=1e-2, batch_size=4,
                      lora_rank=2, **FAST)
    cfg = load_config(tmp_path / "ft" / "config.yaml")
    cfg.edm.sigma_data = 0.5
    trainable = [n for n, p in build_precond(cfg, 3, device="cpu").net.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or (prefix and n.startswith(prefix)) for n in trainable)
    assert (prefix is None or any(n.startswith(prefix) for n in trainable)) and any(".to_q.lora_A." in n for n in trainable)
    kwargs = dict(prompts=["red"]) if kind == "unet" else dict(class_labels=[1])
    assert torch.isfinite(lp.sample(run, n=1, steps=2, output="tensor", device="cpu", **kwargs)).all()


def test_the_default_text_encoder_is_the_pipelines_own_else_the_matching_open_clip_tower(sd, monkeypatch):
    from latentpatch.finetuning import diffusers_bases as bases

    found = bases.resolve_base(str(sd))
    assert found.default_text().model == f"transformers:{sd}"
    monkeypatch.setattr(bases, "_has_transformers", lambda: False)
    with pytest.raises(UserError, match="cross_attention_dim is 32, which no Stable Diffusion text encoder has"):
        found.default_text()
    for width, model, pretrained, layer, padding in [(768, "ViT-L-14-quickgelu", "openai", "last", "eot"),
                                                     (1024, "ViT-H-14", "laion2b_s32b_b79k", "penultimate", "zero")]:
        found.config["cross_attention_dim"] = width
        choice = found.default_text()
        assert (choice.model, choice.pretrained, choice.layer, choice.padding) == (model, pretrained, layer, padding)


def test_a_unet_folder_inside_a_pipeline_is_the_pipeline_and_a_bare_one_keeps_edm(sd, tmp_path):
    from latentpatch.finetuning.starting_points import diffusers_base

    inside = diffusers_base(str(sd / "unet"), None, None)
    assert inside.cfg.edm.precond == "vp" and inside.vae == str(sd)
    shutil.copytree(sd / "unet", tmp_path / "unet")
    with pytest.raises(UserError, match="cross_attention_dim is 32.*pass text_encoder="):  # nothing to go by
        diffusers_base(str(tmp_path / "unet"), None, None)
    bare = diffusers_base(str(tmp_path / "unet"), None, f"transformers:{sd}")
    assert bare.cfg.edm.precond == "edm" and bare.vae is None and "EDM preconditioning" in bare.describe["note"]
    assert bare.text_choice.padding == "eot"  # the named pipeline's tokenizer pads with end-of-text


def test_a_config_without_the_new_keys_loads_as_before_and_vp_stays_in_its_schedule():
    from latentpatch.diffusion.edm import EDMConfig, training_sigmas
    from latentpatch.diffusion.vp import sigma_range

    cfg = load_config(None)
    assert (cfg.edm.precond, cfg.edm.scheduler, cfg.text.layer, cfg.text.padding) == ("edm", None, "last", "masked")
    g = torch.Generator().manual_seed(0)
    plain = (torch.randn([64], generator=torch.Generator().manual_seed(0)) * 1.2 - 1.2).exp()
    assert torch.equal(training_sigmas(64, cfg.edm, g), plain)  # the EDM draw is untouched
    scheduler = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                 "beta_start": 0.00085, "beta_end": 0.012}
    with pytest.raises(UserError, match="leave the pretrained schedule's noise levels"):
        load_config(None, ["edm.precond=vp", f"edm.scheduler={json.dumps(scheduler)}"])  # 0.002..80 is outside
    low, high = sigma_range(scheduler)
    vp = EDMConfig(precond="vp", scheduler=scheduler, sigma_min=low, sigma_max=high)
    vp.check()
    sigmas = training_sigmas(100_000, vp, torch.Generator().manual_seed(0))
    assert vp.sigma_min * (1 - 1e-6) <= float(sigmas.min()) and float(sigmas.max()) <= vp.sigma_max * (1 + 1e-6)
    # a truncated log-normal: its median is the median of N(P_mean, P_std) restricted to the range
    lo, hi = torch.special.ndtr((torch.tensor([vp.sigma_min, vp.sigma_max]).log() + 1.2) / 1.2)
    median = float(torch.exp(-1.2 + 1.2 * torch.special.ndtri((lo + hi) / 2)))
    assert float(sigmas.median()) == pytest.approx(median, rel=0.02)  # 100k draws: about 0.5% standard error


def test_a_hub_id_in_the_hugging_face_cache_is_a_base_like_its_folder(sd, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from latentpatch.finetuning.starting_points import diffusers_base

    repo, commit = "latentpatch-test/tiny-sd", "0123456789abcdef0123456789abcdef01234567"
    entry = tmp_path / "hub" / "models--latentpatch-test--tiny-sd"
    shutil.copytree(sd, entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # offline (conftest)
    found = diffusers_base(repo, None, None)
    assert found.cfg.edm.precond == "vp" and found.vae == repo and found.text_choice.model == f"transformers:{repo}"
    local = diffusers_base(str(sd), None, None)
    assert all(torch.equal(found.state[k], local.state[k]) for k in local.state)
    run = lp.finetune(repo, colour_folder(tmp_path / "images", n=4, size=16), tmp_path / "ft", steps=1,
                      batch_size=4, **FAST)
    info = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert info["autoencoder"]["source"] == repo and info["conditioning"]["text_encoder"]["model"] == f"transformers:{repo}"
    assert torch.isfinite(lp.sample(run, n=1, prompts=["red"], steps=2, output="tensor", device="cpu")).all()
