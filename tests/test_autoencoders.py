"""Autoencoders: tiny random diffusers VAEs saved to disk and loaded through the real load path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from latentpatch.autoencoders import (
    AutoencoderInfo, folder_revision, load_autoencoder, load_autoencoder_from_info, resolve_dtype,
)
from latentpatch.errors import UserError
from latentpatch.io import sha256_file

diffusers = pytest.importorskip("diffusers")
# diffusers itself passes huggingface_hub a deprecated argument; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`:UserWarning")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_kl(latent_channels: int = 4, **extra) -> "diffusers.AutoencoderKL":
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 16), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=latent_channels, norm_num_groups=8,
        layers_per_block=1, sample_size=16, **extra,
    ).eval()


@pytest.fixture(scope="module")
def vaes(tmp_path_factory) -> dict[str, Path]:
    """kl: SD-like 4 channels, factor 4; sd3: 16 channels with a shift; tiny: AutoencoderTiny, factor 4."""
    root = tmp_path_factory.mktemp("vaes")
    tiny_kl().save_pretrained(root / "kl")
    tiny_kl(16, scaling_factor=1.5305, shift_factor=0.0609).save_pretrained(root / "sd3")
    torch.manual_seed(1)
    diffusers.AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1), latent_channels=4,
    ).save_pretrained(root / "tiny")
    return {name: root / name for name in ("kl", "sd3", "tiny")}


def images(b: int = 2, side: int = 16) -> torch.Tensor:
    return torch.rand(b, 3, side, side, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_pixel_is_the_exact_identity():
    ae = load_autoencoder("pixel")
    x = images()
    mean, std = ae.encode_moments(x)
    assert std is None and torch.equal(mean, x) and torch.equal(ae.encode(x), x) and torch.equal(ae.decode(x), x)
    assert ae.info == AutoencoderInfo("pixel", "pixel", None, 3, 1, 1.0, 0.0)
    assert ae.decode(x).dtype == torch.float32


def test_kl_folder_shapes_dtypes_factor_and_config_scaling(vaes):
    ae = load_autoencoder(vaes["kl"])
    assert (ae.info.kind, ae.info.factor, ae.info.latent_channels) == ("kl", 4, 4)
    assert (ae.info.scaling_factor, ae.info.shift_factor) == (0.18215, 0.0)  # shift None in config -> 0
    assert ae.dtype == torch.float32 and ae.info.source == str(vaes["kl"].resolve())
    mean, std = ae.encode_moments(images())
    assert mean.shape == std.shape == (2, 4, 4, 4) and mean.dtype == std.dtype == torch.float32
    out = ae.decode(mean)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32 and out.abs().max() <= 1


def test_sixteen_channel_vae_reads_scale_and_shift_and_normalises_like_the_formula(vaes):
    ae = load_autoencoder(vaes["sd3"])
    assert (ae.info.latent_channels, ae.info.scaling_factor, ae.info.shift_factor) == (16, 1.5305, 0.0609)
    vae = diffusers.AutoencoderKL.from_pretrained(vaes["sd3"]).eval()
    x = images()
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        reference = vae.decode(post.mean).sample.clamp(-1, 1)
    mean, std = ae.encode_moments(x)
    torch.testing.assert_close(mean, (post.mean - 0.0609) * 1.5305, rtol=0, atol=1e-6)
    torch.testing.assert_close(std, post.std * 1.5305, rtol=0, atol=1e-6)
    torch.testing.assert_close(ae.decode(mean), reference, rtol=0, atol=1e-5)


def test_overrides_replace_config_scaling_and_shift(vaes):
    ae = load_autoencoder(vaes["kl"], scaling_factor=0.5, shift_factor=0.25)
    assert (ae.info.scaling_factor, ae.info.shift_factor) == (0.5, 0.25)
    plain = load_autoencoder(vaes["kl"])
    raw = plain.encode_moments(images())[0] / 0.18215
    torch.testing.assert_close(ae.encode_moments(images())[0], (raw - 0.25) * 0.5)


def test_encode_draws_from_the_posterior_with_the_given_generator(vaes):
    ae = load_autoencoder(vaes["kl"])
    mean, std = ae.encode_moments(images())
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ae.encode(images(), generator=torch.Generator().manual_seed(7)), mean + std * eps)
    assert torch.equal(ae.encode(images(), sample=False), mean)


def test_tiny_autoencoder_latents_are_its_raw_encoder_output(vaes):
    ae = load_autoencoder(vaes["tiny"])
    assert (ae.info.kind, ae.info.factor, ae.info.scaling_factor, ae.info.shift_factor) == ("tiny", 4, 1.0, 0.0)
    vae = diffusers.AutoencoderTiny.from_pretrained(vaes["tiny"]).eval()
    x = images()
    with torch.no_grad():
        raw = vae.encode(x).latents
        reference = vae.decode(raw).sample.clamp(-1, 1)
    mean, std = ae.encode_moments(x)
    assert std is None and mean.shape == (2, 4, 4, 4)
    torch.testing.assert_close(mean, raw, rtol=0, atol=1e-6)
    torch.testing.assert_close(ae.decode(mean), reference, rtol=0, atol=1e-5)
    assert torch.equal(ae.encode(x), mean)


def test_full_pipeline_folder_loads_its_vae_subfolder(vaes, tmp_path):
    shutil.copytree(vaes["kl"], tmp_path / "pipe" / "vae")
    ae = load_autoencoder(tmp_path / "pipe")
    assert ae.info.source == str((tmp_path / "pipe" / "vae").resolve())


def test_revision_of_a_folder_is_the_sha256_of_its_weights(vaes):
    (weights,) = vaes["kl"].glob("*.safetensors")
    assert load_autoencoder(vaes["kl"]).info.revision == sha256_file(weights) == folder_revision(vaes["kl"])


def test_info_round_trips_through_a_dict_and_rejects_unknown_keys(vaes):
    info = load_autoencoder(vaes["sd3"]).info
    assert AutoencoderInfo.from_dict(info.to_dict()) == info
    with pytest.raises(UserError, match="unknown keys \\['colour'\\]"):
        AutoencoderInfo.from_dict({**info.to_dict(), "colour": 1})


def test_load_from_info_gives_the_same_decoder(vaes):
    ae = load_autoencoder(vaes["sd3"])
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    again = load_autoencoder_from_info(ae.info.to_dict())
    assert again.info == ae.info and torch.equal(again.decode(latents), ae.decode(latents))
    assert load_autoencoder_from_info(load_autoencoder("pixel").info).info.kind == "pixel"


def test_load_from_info_names_a_vanished_folder_and_warns_on_changed_weights(vaes, tmp_path):
    shutil.copytree(vaes["kl"], tmp_path / "vae")
    info = load_autoencoder(tmp_path / "vae").info
    tiny_kl(scaling_factor=0.18215).to(torch.float64).save_pretrained(tmp_path / "vae")  # new weights, same shape
    with pytest.warns(UserWarning, match="changed since they were recorded"):
        assert load_autoencoder_from_info(info).info.revision != info.revision
    shutil.rmtree(tmp_path / "vae")
    with pytest.raises(UserError, match=f"folder {info.source} recorded in the latent store no longer exists"):
        load_autoencoder_from_info(info)


def test_missing_vae_is_a_user_error_naming_the_spec(tmp_path):
    with pytest.raises(UserError, match="'/no/such/vae' not found"):
        load_autoencoder("/no/such/vae")
    with pytest.raises(UserError, match="has no config.json"):
        load_autoencoder(tmp_path)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in tmp, offline whatever the environment says: the tests never reach the
    network, and always run."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hub_id_not_in_the_offline_cache_says_how_to_get_it(hub_cache):
    with pytest.raises(UserError, match="'lp-test/not-cached'.*download it once with network access"):
        load_autoencoder("lp-test/not-cached")


def test_cached_hub_pipeline_repo_records_the_commit_and_reads_vae_subfolder(vaes, hub_cache):
    repo = hub_cache / "models--lp-test--pipe"
    shutil.copytree(vaes["kl"], repo / "snapshots" / COMMIT / "vae")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    ae = load_autoencoder("lp-test/pipe")
    assert (ae.info.source, ae.info.revision, ae.info.kind) == ("lp-test/pipe", COMMIT, "kl")
    assert load_autoencoder_from_info(ae.info).info == ae.info


def test_builtin_resolves_to_the_shipped_folder_or_says_it_is_not_shipped(vaes, tmp_path, monkeypatch):
    import latentpatch.autoencoders.loading as loading

    name = loading.BUILTIN_NAME
    monkeypatch.setattr(loading, "WEIGHTS_DIR", tmp_path)  # an install without the weights folder
    with pytest.raises(UserError, match=f"builtin VAE '{name}' is not shipped in this install"):
        load_autoencoder("builtin")
    shutil.copytree(vaes["kl"], tmp_path / name)
    info = load_autoencoder("builtin").info
    assert (info.source, info.revision) == (f"builtin:{name}", folder_revision(vaes["kl"]))
    assert load_autoencoder_from_info(info).info == info


def test_wrong_kind_shapes_and_dtype_are_user_errors(vaes):
    with pytest.raises(UserError, match="holds a AutoencoderKL"):
        load_autoencoder(vaes["kl"], kind="tiny")
    ae = load_autoencoder(vaes["kl"])
    with pytest.raises(UserError, match="divisible by 4"):
        ae.encode(images(side=18))
    with pytest.raises(UserError, match="latents \\[B,4,h,w\\]"):
        ae.decode(torch.zeros(1, 16, 4, 4))
    with pytest.raises(UserError, match="dtype 'int8'"):
        resolve_dtype("int8", torch.device("cpu"))


def test_default_dtype_is_bf16_on_cuda_and_float32_on_cpu_and_outputs_are_float32(vaes):
    ae = load_autoencoder(vaes["kl"], dtype="bf16")
    assert ae.dtype == next(ae.model.parameters()).dtype == torch.bfloat16
    mean, std = ae.encode_moments(images())
    assert mean.dtype == std.dtype == ae.decode(mean).dtype == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("fp16", torch.device("cuda")) == torch.float16


def test_a_moved_vae_folder_with_the_same_weights_is_the_same_latent_space_and_other_weights_are_not(vaes, tmp_path):
    """One answer for every stage (fine-tuning, resume, eval): identity is the weights' sha256, not the path."""
    from latentpatch.autoencoders import same_latent_space

    here = load_autoencoder(vaes["kl"]).info.to_dict()
    shutil.copytree(vaes["kl"], tmp_path / "moved")
    moved = load_autoencoder(tmp_path / "moved").info.to_dict()
    assert moved["source"] != here["source"] and same_latent_space(here, moved)
    tiny_kl(scaling_factor=0.18215).to(torch.float64).save_pretrained(tmp_path / "moved")  # other weights
    other = load_autoencoder(tmp_path / "moved").info.to_dict()
    assert other["scaling_factor"] == here["scaling_factor"] and not same_latent_space(here, other)
    assert not same_latent_space(here, {**here, "scaling_factor": 0.5})
