"""train-vae and the builtin VAE it made: the shipped weights load offline like any SD VAE (by name, by folder,
through diffusers), reconstruct held-out photographs to the reported PSNR and give flat colours back; tiny runs
write loadable folders with a colour check, resume exactly, and decoder-only fine-tuning leaves the encoder
bit-identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from latentpatch.autoencoders import BUILTIN_NAME, builtin_folder, load_autoencoder
from latentpatch.autoencoders.vae_training import data as vae_data
from latentpatch.autoencoders.vae_training import train as train_vae_module
from latentpatch.autoencoders.vae_training.colour_check import colour_check, flat_colours
from latentpatch.autoencoders.vae_training.train import (
    EVAL_SEED,
    REPORT_NAME,
    VAETrainConfig,
    evaluate_autoencoder,
    latent_scaling_factor,
    lr_factor,
    round_trip,
    train_vae,
)
from latentpatch.autoencoders.vae_training.export import save_state
from latentpatch.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`:UserWarning")
PSNR_BAR_DB = 27.0  # on the reference photographs (scikit-learn's china and flower), never trained on
HELD_OUT_BAR_DB = 26.0  # on the skimage images held out of training (coffee, camera, gravel)
COLOUR_BAR = 0.15  # largest error of a flat field's mean colour, per channel, on the [-1, 1] scale
OLD_BUILTIN = "latentpatch-vae-f4"  # kept so latent stores that recorded it still decode with their own weights
ENCODER_PREFIXES = ("encoder.", "quant_conv.")


def tiny_config(out: Path, data: Path, **kw) -> VAETrainConfig:
    base = dict(out=out, data=data, steps=3, batch_size=2, crop=32, channels=(8, 8, 16), norm_groups=8, holdout=1,
                eval_crops=4, eval_every=2, checkpoint_every=2, scale_crops=8, progress=False, device="cpu",
                reference_check=False)
    return VAETrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Three small real photographs in a folder tree (one in a subfolder, one greyscale)."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for name, path in (("astronaut", "a.png"), ("coffee", "sub/c.jpg"), ("camera", "g.png")):
        array = vae_data.load_skimage_image(name)[:, 100:196, 100:196].permute(1, 2, 0).numpy()
        Image.fromarray(array[:, :, 0] if name == "camera" else array).save(root / path)
    return root


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory, photos) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "vae"
    train_vae(tiny_config(out, photos))
    return out


def test_builtin_vae_loads_offline_by_name_and_by_folder_as_a_diffusers_kl_vae():
    folder = builtin_folder()
    config = json.loads((folder / "config.json").read_text())
    by_name, by_path = load_autoencoder("builtin"), load_autoencoder(folder)
    assert by_name.info.source == f"builtin:{BUILTIN_NAME}" and by_path.info.source == str(folder.resolve())
    for ae in (by_name, by_path):
        assert (ae.info.kind, ae.info.factor, ae.info.latent_channels) == ("kl", 4, 4)
        assert ae.info.scaling_factor == config["scaling_factor"] and ae.info.shift_factor == 0.0
    assert config["_class_name"] == "AutoencoderKL" and config["shift_factor"] is None
    weights = folder / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert weights.stat().st_size < 10 * 2**20
    assert {"README.md", REPORT_NAME} <= {p.name for p in folder.iterdir()}


def twelve_hues(value: float = 0.9) -> torch.Tensor:
    return flat_colours(hues=12, saturations=(0.9,), values=(value,))[:12]


def test_builtin_vae_decodes_finite_images_and_flat_colours_through_every_load_path():
    from diffusers import AutoencoderKL

    folder = builtin_folder()
    by_diffusers = AutoencoderKL.from_pretrained(folder).eval()
    paths = {
        "builtin": round_trip(load_autoencoder("builtin")),
        "folder": round_trip(load_autoencoder(folder)),
        "diffusers": lambda x: by_diffusers.decode(by_diffusers.encode(x).latent_dist.mean).sample.detach(),
    }
    photo = vae_data.fixed_crops([vae_data.load_skimage_image("coffee")], 2, 64, EVAL_SEED)
    for name, reconstruct in paths.items():
        assert torch.isfinite(reconstruct(photo)).all(), name
        check = colour_check(reconstruct, twelve_hues(), side=32)
        assert check.worst_channel_error <= COLOUR_BAR, (name, check.worst_field)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(load_autoencoder("builtin").decode(z)).all()


def test_builtin_vae_reconstructs_held_out_photographs_to_the_reported_psnr():
    report = json.loads((builtin_folder() / REPORT_NAME).read_text())
    assert report["held_out"] == list(vae_data.SKIMAGE_HOLDOUT_ORDER[:3])
    assert not set(report["held_out"]) & set(report["train_images"])
    images = [vae_data.load_skimage_image(n) for n in report["held_out"]]
    crops = vae_data.fixed_crops(images, 32, 64, EVAL_SEED)
    psnr, ssim = evaluate_autoencoder(load_autoencoder("builtin"), crops)
    assert psnr == pytest.approx(report["heldout_psnr"], abs=0.05)
    assert ssim == pytest.approx(report["heldout_ssim"], abs=0.002)
    assert psnr >= HELD_OUT_BAR_DB


def test_builtin_vae_reaches_the_bar_on_the_reference_photographs_it_never_saw():
    pytest.importorskip("sklearn")
    report = json.loads((builtin_folder() / REPORT_NAME).read_text())["reference"]
    photos = vae_data.load_reference_images()
    crops = vae_data.fixed_crops([photos[n] for n in vae_data.REFERENCE_IMAGES], 32, 64, EVAL_SEED)
    psnr, ssim = evaluate_autoencoder(load_autoencoder("builtin"), crops)
    assert (report["crops"], report["crop"], report["seed"]) == (32, 64, EVAL_SEED)
    assert psnr == pytest.approx(report["psnr"], abs=0.05) and ssim == pytest.approx(report["ssim"], abs=0.002)
    assert psnr >= PSNR_BAR_DB


def test_the_old_builtin_still_loads_by_its_name_for_latent_stores_that_recorded_it():
    ae = load_autoencoder(f"builtin:{OLD_BUILTIN}")
    assert ae.info.source == f"builtin:{OLD_BUILTIN}" and BUILTIN_NAME != OLD_BUILTIN
    recorded = json.loads((builtin_folder(OLD_BUILTIN) / "config.json").read_text())["scaling_factor"]
    assert ae.info.scaling_factor == recorded


def test_colour_check_is_zero_for_the_identity_and_measures_a_grey_decoder_per_channel():
    colours = torch.tensor([[1.0, -1.0, -1.0], [-0.5, 0.5, 0.0]])
    exact = colour_check(lambda x: x, colours, side=8)
    assert exact.worst == [0.0, 0.0, 0.0] and exact.delta_e_max == pytest.approx(0.0, abs=1e-3)
    grey = colour_check(lambda x: x.mean(1, keepdim=True).expand_as(x), colours, side=8)
    # red comes back (-1/3, -1/3, -1/3): off by 4/3, 2/3, 2/3; (-0.5, 0.5, 0) comes back 0: off by 0.5, 0.5, 0
    assert grey.worst == pytest.approx([4 / 3, 2 / 3, 2 / 3]) and grey.worst_field[0] == [1.0, -1.0, -1.0]
    assert grey.mean == pytest.approx([(4 / 3 + 0.5) / 2, (2 / 3 + 0.5) / 2, 1 / 3]) and grey.delta_e_max > 50
    assert len(flat_colours()) == 12 * 4 * 3 + 4 and flat_colours().abs().max() <= 1


def test_tiny_run_writes_a_loadable_fp16_folder_with_the_scaling_factor_measured_on_the_data(tiny_vae, photos):
    ae = load_autoencoder(tiny_vae)
    config = json.loads((tiny_vae / "config.json").read_text())
    report = json.loads((tiny_vae / REPORT_NAME).read_text())
    assert (ae.info.factor, ae.info.latent_channels) == (4, 4) and config["shift_factor"] is None
    assert config["block_out_channels"] == [8, 8, 16] and config["mid_block_add_attention"] is False
    weights = load_file(str(tiny_vae / "diffusion_pytorch_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float16}
    # Recompute 1 / std of the training crops' latents with the saved (fp16) weights: the same up to fp16 rounding.
    cfg = tiny_config(tiny_vae, photos)
    sampler = vae_data.CropSampler.from_images(
        [vae_data.load_folder_images(photos, 32, 1024)[n] for n in report["train_images"]], 32)
    expected = latent_scaling_factor(ae.model, sampler, cfg.scale_crops, cfg.seed + 1, torch.device("cpu"))
    assert config["scaling_factor"] == pytest.approx(expected, rel=2e-2) and config["scaling_factor"] != 0.18215
    assert report["scaling_factor"] == config["scaling_factor"] and len(report["held_out"]) == 1
    assert [h["step"] for h in report["history"]] == [2, 3] and report["heldout_psnr"] > 0
    assert report["colour_check"]["fields"] == len(flat_colours()) and "reference" not in report
    assert "## Flat colours" in (tiny_vae / "README.md").read_text()
    out = ae.decode(ae.encode(torch.zeros(1, 3, 32, 32), sample=False))
    assert out.shape == (1, 3, 32, 32)


def test_resuming_a_killed_run_gives_the_same_weights_as_an_unbroken_run(tmp_path, photos, monkeypatch):
    train_vae(tiny_config(tmp_path / "straight", photos, steps=4, holdout=0))

    def save_then_die(*args, **kw):
        save_state(*args, **kw)
        raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    with monkeypatch.context() as m:
        m.setattr(train_vae_module, "save_state", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train_vae(tiny_config(tmp_path / "broken", photos, steps=4, holdout=0))
    train_vae(tiny_config(tmp_path / "broken", photos, steps=4, holdout=0, resume=True))
    a = load_file(str(tmp_path / "straight" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "broken" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="crop"):
        train_vae(tiny_config(tmp_path / "broken", photos, steps=5, crop=16, holdout=0, resume=True))


def test_decoder_only_finetune_via_cli_keeps_the_encoder_and_scaling_factor_exactly(tmp_path, tiny_vae, photos):
    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "latentpatch.cli", "train-vae", "--out", str(out), "--data", str(photos),
           "--init", str(tiny_vae), "--train", "decoder", "--steps", "2", "--batch-size", "2", "--crop", "32",
           "--holdout", "1", "--lr", "1e-2", "--no-progress", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "held-out PSNR" in done.stdout and "SSIM" in done.stdout
    assert "reference photographs (china, flower): PSNR" in done.stdout and "flat colours (148 fields)" in done.stdout
    before = load_file(str(tiny_vae / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    encoder = [k for k in before if k.startswith(ENCODER_PREFIXES)]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    scale = lambda p: json.loads((p / "config.json").read_text())["scaling_factor"]  # noqa: E731
    assert scale(out) == scale(tiny_vae)
    assert json.loads((out / REPORT_NAME).read_text())["command"].startswith("latentpatch train-vae --out")


def test_cli_rejects_a_bad_train_option_with_a_clear_error(tmp_path, photos):
    cmd = [sys.executable, "-m", "latentpatch.cli", "train-vae", "--out", str(tmp_path / "x"), "--data", str(photos),
           "--train", "encoder", "--steps", "1", "--crop", "32", "--holdout", "1", "--channels", "8,8,16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "error: --train 'encoder' is not valid" in done.stderr
    assert "Traceback" not in done.stderr


def test_holdout_takes_the_named_images_first_and_bad_options_are_user_errors():
    names = list(vae_data.SKIMAGE_IMAGES)
    train, held = vae_data.split_holdout(names, 3, seed=7, order=vae_data.SKIMAGE_HOLDOUT_ORDER)
    assert held == ["coffee", "camera", "gravel"] and sorted(train + held) == sorted(names)
    with pytest.raises(UserError, match="--holdout"):
        vae_data.split_holdout(["a", "b"], 2, seed=0)
    with pytest.raises(UserError, match="--train decoder .* --init"):
        VAETrainConfig(out=Path("unused"), train="decoder")


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = VAETrainConfig(out=Path("unused"), steps=1000, warmup=100, min_lr_ratio=0.01)
    assert lr_factor(0, cfg) == pytest.approx(0.01) and lr_factor(99, cfg) == 1.0
    assert lr_factor(100, cfg) == 1.0 and lr_factor(550, cfg) == pytest.approx(0.505)
    assert lr_factor(1000, cfg) == pytest.approx(0.01)


def test_reference_check_without_scikit_learn_says_how_to_install_it(tmp_path, photos, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"pip install 'latentpatch\[vae\]'"):
        train_vae(tiny_config(tmp_path / "x", photos, reference_check=True))
    assert not (tmp_path / "x").exists()  # refused before any training


def test_reference_photographs_are_the_two_sklearn_samples_at_native_size():
    pytest.importorskip("sklearn")
    photos = vae_data.load_reference_images()
    assert list(photos) == list(vae_data.REFERENCE_IMAGES)
    assert all(p.shape == (3, 427, 640) and p.dtype == torch.uint8 for p in photos.values())
    assert not set(vae_data.REFERENCE_IMAGES) & set(vae_data.SKIMAGE_IMAGES)


def test_colour_jitter_turns_hues_paints_greyscale_crops_and_leaves_unchosen_crops_alone():
    colour = vae_data.fixed_crops([vae_data.load_skimage_image("coffee")], 8, 16, EVAL_SEED)
    grey = vae_data.fixed_crops([vae_data.load_skimage_image("camera")], 8, 16, EVAL_SEED)
    same = vae_data.jitter_colours(colour, torch.Generator().manual_seed(0), 0.0, (0.5, 2.0))
    assert torch.equal(same, colour)
    a = vae_data.jitter_colours(colour, torch.Generator().manual_seed(0), 1.0, (0.5, 2.0))
    b = vae_data.jitter_colours(colour, torch.Generator().manual_seed(0), 1.0, (0.5, 2.0))
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    assert (a - colour).abs().mean() > 0.05  # colours moved; the mean brightness barely does
    assert (a.mean(1) - colour.mean(1)).abs().mean() < (a - colour).abs().mean()
    painted = vae_data.jitter_colours(grey, torch.Generator().manual_seed(0), 1.0, (0.5, 2.0))
    spread = (painted.amax(1) - painted.amin(1)).flatten(1).amax(1)
    assert (spread > 0.1).all() and painted.min() >= -1 and painted.max() <= 1  # a hue turn alone leaves them grey


def test_colour_fields_are_flat_or_smooth_and_replace_the_chosen_share_of_crops():
    g = torch.Generator().manual_seed(0)
    fields = vae_data.colour_fields(64, 16, g)
    assert fields.shape == (64, 3, 16, 16) and fields.min() >= -1 and fields.max() <= 1
    steps = (fields[..., 1:] - fields[..., :-1]).abs().amax((1, 2, 3))
    assert (steps == 0).sum() > 16 and steps.max() < 0.5  # some perfectly flat, all smooth
    x = torch.zeros(200, 3, 8, 8)
    mixed = vae_data.mix_colour_fields(x, torch.Generator().manual_seed(1), 0.25)
    share = (mixed != 0).flatten(1).any(1).float().mean()
    assert 0.15 < share < 0.35
    with pytest.raises(UserError, match="--colour-fields"):
        VAETrainConfig(out=Path("unused"), colour_fields=1.5)
    with pytest.raises(UserError, match="--saturation"):
        VAETrainConfig(out=Path("unused"), saturation=(2.0, 0.5))


def test_crops_are_in_range_and_fixed_by_the_generator():
    images = [torch.from_numpy(np.arange(3 * 40 * 50, dtype=np.int64).reshape(3, 40, 50) % 256).to(torch.uint8)]
    sampler = vae_data.CropSampler.from_images(images, 16)
    a = sampler.draw(4, torch.Generator().manual_seed(0))
    b = sampler.draw(4, torch.Generator().manual_seed(0))
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    with pytest.raises(UserError, match="smaller than the crop"):
        vae_data.CropSampler.from_images(images, 48)
