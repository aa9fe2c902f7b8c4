"""Fine-tuning: from a run or a widened bare pretrained UNet, exactly where the base was, with or without LoRA.

Pipelines, their own preconditioning, DiTs and text features: tests/test_pretrained.py."""

import json

import pytest
import torch
from tiny_runs import make_tiny_run
from diffusers import UNet2DConditionModel, UNet2DModel
from safetensors.torch import load_file
from text_helpers import colour_folder, write_clip_config
from typer.testing import CliRunner

import latentpatch as lp
from latentpatch.checkpoints import latest_checkpoint
from latentpatch.conditioning import Conditioning
from latentpatch.config import load_config
from latentpatch.denoiser import build_precond
from latentpatch.errors import UserError
from latentpatch.models import PretrainedConfig
from latentpatch.finetuning.diffusers_bases import resolve_base
from latentpatch.models.widen import json_config, widen_unet
from latentpatch.patches import full_coordinates
from latentpatch.runs import load_run

FAST = dict(device="cpu", progress=False)


def tiny_unet(cls, in_channels=4, **extra):
    torch.manual_seed(0)
    common = dict(sample_size=8, in_channels=in_channels, out_channels=in_channels, block_out_channels=(16, 32),
                  layers_per_block=1, norm_num_groups=8)
    if cls is UNet2DModel:
        return UNet2DModel(down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, **common, **extra)
    return UNet2DConditionModel(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2,
                                cross_attention_dim=32, **common, **extra)


@pytest.fixture(scope="module")
def clip_json(tmp_path_factory):
    return write_clip_config(tmp_path_factory.mktemp("clip") / "tiny-clip.json")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return colour_folder(tmp_path_factory.mktemp("data") / "images", n=12)


@pytest.fixture
def base_run(tmp_path):
    return make_tiny_run(tmp_path / "base")  # an unconditional 2-block DiT on 3 x 8 x 8 pixel latents


@pytest.mark.parametrize("cls", [UNet2DModel, UNet2DConditionModel])
def test_widened_unet_computes_exactly_what_the_original_did(cls, tmp_path):
    unet = tiny_unet(cls).eval()
    unet.save_pretrained(tmp_path / "pipeline" / "unet")  # a pipeline folder: the UNet is in unet/
    widened = widen_unet(resolve_base(str(tmp_path / "pipeline")).load_network(), 4).eval()
    assert widened.conv_in.weight.shape[1] == 6 and widened.config.in_channels == 6
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 4, 8, 8), (1, 4, 64, 64), (3, 4, 16, 24)]:
        x, t = torch.randn(shape, generator=g), torch.tensor([0.3, -1.2, 0.9][: shape[0]])
        text = {}
        if cls is UNet2DConditionModel:
            text = dict(encoder_hidden_states=torch.randn(shape[0], 5, 32, generator=g))
        coords = full_coordinates(shape[0], *shape[2:])
        with torch.no_grad():
            before = unet(x, t, **text).sample
            after = widened(torch.cat([x, coords], 1), t, **text).sample
        assert torch.equal(before, after)


def test_widened_unet_as_a_latentpatch_denoiser_equals_the_original(tmp_path):
    unet = tiny_unet(UNet2DConditionModel).eval()
    widened = widen_unet(tiny_unet(UNet2DConditionModel), 4)
    cfg = load_config(None, ["model.text_dim=32", "model.attention=sdpa", "edm.sigma_data=0.5"])
    cfg.model.arch, cfg.model.pretrained = "pretrained", PretrainedConfig("UNet2DConditionModel", json_config(widened))
    state = {f"net.unet.{k}": v for k, v in widened.state_dict().items()}
    net = build_precond(cfg, 4, device="cpu", init_state=state).net.eval()
    g = torch.Generator().manual_seed(1)
    x, tokens = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 32, generator=g)
    c_noise = torch.tensor([0.1, -0.4])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    with torch.no_grad():
        cond = Conditioning(text_tokens=tokens, text_mask=mask)
        ours = net(torch.cat([x, full_coordinates(2, 8, 8)], 1), c_noise, cond)
        theirs = unet(x, c_noise, encoder_hidden_states=tokens, encoder_attention_mask=mask).sample
    assert torch.equal(ours, theirs)


def test_finetune_a_pretrained_text_unet_then_sample_with_prompts(tmp_path, images, clip_json):
    tiny_unet(UNet2DConditionModel, in_channels=3).save_pretrained(tmp_path / "unet")
    wide = write_clip_config(tmp_path / "wide-clip.json", width=48)
    with pytest.raises(UserError, match="width 48 but the UNet's cross_attention_dim is 32"):
        lp.finetune(tmp_path / "unet", images, tmp_path / "bad", vae="pixel", resolution=8, text_encoder=str(wide),
                    steps=2, **FAST)
    with pytest.raises(UserError, match="has no vae/ beside the network: give vae="):
        lp.finetune(tmp_path / "unet", images, tmp_path / "bad2", steps=2, text_encoder=str(clip_json), **FAST)
    run = lp.finetune(tmp_path / "unet", images, tmp_path / "ft", vae="pixel", resolution=8,
                      text_encoder=str(clip_json), steps=3, batch_size=4, **FAST)
    assert run.step == 3 and (tmp_path / "ft" / "latents" / "text_null.safetensors").is_file()
    cfg = load_config(tmp_path / "ft" / "config.yaml")
    assert cfg.model.pretrained.config["in_channels"] == 5 and cfg.model.text_dim == 32 and cfg.model.pooled_text_dim == 0
    assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["kind"] == "UNet2DConditionModel"
    out = lp.sample(run, n=2, prompts=["red"], guidance=2.0, steps=2, output="tensor", device="cpu")
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()


def test_finetune_from_a_run_starts_from_its_ema_weights(base_run, images, tmp_path):
    result = lp.finetune(base_run, images, tmp_path / "ft", steps=2, lr=0.0, batch_size=4, **FAST)
    ema = load_file(latest_checkpoint(base_run) / "ema.safetensors")
    raw = load_file(result.checkpoint / "model.safetensors")
    assert raw.keys() == ema.keys() and all(torch.equal(raw[k], ema[k]) for k in ema)  # lr 0: nothing moved
    info = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert info["latents"] == str((tmp_path / "ft" / "latents").resolve())
    assert info["conditioning"]["text_encoder"] is None


def test_an_unconditional_dit_gains_text_and_starts_unchanged(base_run, images, clip_json, tmp_path):
    lp.finetune(base_run, images, tmp_path / "ft", steps=1, lr=0.0, batch_size=4,
                text_encoder=str(clip_json), **FAST)
    base, tuned = load_run(base_run, weights="ema"), load_run(tmp_path / "ft", weights="raw")
    assert tuned.cfg.model.text_dim == 32 and tuned.spec.text_encoder["model"] == str(clip_json)
    from latentpatch.conditioning.requested import request_conditioning

    cond, _ = request_conditioning(tuned.spec, tuned.text_encoder(), prompts=["red", "a blue wall"])
    g = torch.Generator().manual_seed(0)
    x, sigma = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([0.5, 3.0])
    coords = full_coordinates(2, 8, 8)
    with torch.no_grad():
        assert torch.equal(tuned.precond(x, sigma, coords, cond), base.precond(x, sigma, coords))


def test_lora_finetune_trains_adapters_only_and_loads_merged(base_run, images, tmp_path):
    result = lp.finetune(base_run, images, tmp_path / "ft", steps=3, lr=1e-2, batch_size=4, lora_rank=2, **FAST)
    raw = load_file(result.checkpoint / "model.safetensors")
    assert any(".lora_A." in k for k in raw)  # adapters kept apart in checkpoints: a resume is exact
    cfg = load_config(tmp_path / "ft" / "config.yaml")
    trainable = [n for n, p in build_precond(cfg, 3, device="cpu").named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base = load_file(latest_checkpoint(base_run) / "ema.safetensors")
    merged = load_run(tmp_path / "ft", weights="raw").precond.state_dict()
    assert torch.equal(merged["net.t_embedder.mlp.0.weight"], base["net.t_embedder.mlp.0.weight"])  # frozen
    qkv = merged["net.blocks.0.attn.qkv.base_layer.weight"]  # the adapter folded into the weight
    assert not torch.equal(qkv, base["net.blocks.0.attn.qkv.weight"])
    out = lp.sample(result, n=1, steps=2, output="tensor", device="cpu")
    assert torch.isfinite(out).all()


def test_a_pixart_transformer_is_refused_with_the_reason(tmp_path, images):
    for name, extra in [("PixArtTransformer2DModel", {}), ("Transformer2DModel", {"norm_type": "ada_norm_single"})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"_class_name": name, **extra}))
        with pytest.raises(UserError, match="PixArt-style transformer.*T5-XXL features through transformers"):
            lp.finetune(tmp_path / name, images, tmp_path / "ft", steps=1, **FAST)
    with pytest.raises(UserError, match="has no cross-attention"):
        tiny_unet(UNet2DModel, in_channels=3).save_pretrained(tmp_path / "unet")
        lp.finetune(tmp_path / "unet", images, tmp_path / "ft", steps=1, text_encoder="RN50", **FAST)


def test_train_cli_fine_tunes_with_base(base_run, images, tmp_path):
    from latentpatch.cli.app import app

    result = CliRunner().invoke(app, ["train", "--base", str(base_run), "--data", str(images), "--out",
                                      str(tmp_path / "ft"), "--max-steps", "2", "--device", "cpu", "--no-progress",
                                      "train.batch_size=4"])
    assert result.exit_code == 0, result.output
    assert "fine-tuned to step 2" in result.output
    missing = CliRunner().invoke(app, ["train", "--base", str(base_run), "--out", str(tmp_path / "x")])
    assert missing.exit_code != 0 and "--base needs --data" in str(missing.exception)


def test_a_small_folder_fine_tune_is_guarded_by_default_with_lora_too(base_run, tmp_path):
    """The base's held-out settings are not inherited: the fine-tune's own folder decides (24 images: 4 held out),
    and `sample` loads the fine-tune's BEST."""
    from latentpatch.checkpoints import best_checkpoint

    folder = colour_folder(tmp_path / "faces", n=24, captions=False)
    result = lp.finetune(base_run, folder, tmp_path / "ft", steps=8, lr=1e-2, batch_size=4, lora_rank=2, **FAST)
    info = json.loads((tmp_path / "ft" / "run.json").read_text())["heldout"]
    assert (info["held_out_images"], info["every"], info["patience"]) == (4, 8, 10)  # 8 steps: at 0 and 8
    cfg = load_config(tmp_path / "ft" / "config.yaml")
    assert (cfg.heldout.share, cfg.heldout.every, cfg.train.patience) == (4 / 24, 8, 10)
    assert result.best == best_checkpoint(tmp_path / "ft") and result.summary.startswith("Best held-out loss")
    assert f"at step {int(result.best.name[5:])}" in result.summary
    assert load_run(tmp_path / "ft").step == int(result.best.name[5:])


def test_a_fine_tunes_callback_stops_it_and_asks_for_held_out_evaluations(base_run, tmp_path):
    """lp.finetune passes `callback` to the trainer: EVALUATE scores the held-out images after that step (here 3,
    off the every-8 grid), True ends the fine-tune after a checkpoint of that step (5, not the 40 asked for)."""
    from latentpatch.training.logging import read_log
    from latentpatch.training.results import EVALUATE

    folder = colour_folder(tmp_path / "faces", n=24, captions=False)

    def callback(info):
        return True if info.step == 5 else EVALUATE if info.step == 3 else None

    result = lp.finetune(base_run, folder, tmp_path / "ft", steps=40, lr=1e-2, batch_size=4, callback=callback, **FAST)
    assert result.step == 5 and int(latest_checkpoint(tmp_path / "ft").name[5:]) == 5
    scored = [r["step"] for r in read_log(tmp_path / "ft" / "log.jsonl") if "heldout_loss" in r]
    assert scored == [0, 3, 5]
