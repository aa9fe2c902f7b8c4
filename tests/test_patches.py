"""The coordinate channels and the patch schedule, checked against the formulas in the paper."""

import math

import pytest
import torch

from latentpatch.config import PatchConfig
from latentpatch.errors import UserError
from latentpatch.patches import (
    PatchSchedule,
    coordinate_grid,
    crop_coordinates,
    crop_offsets,
    crop_offsets_within,
    full_coordinates,
    random_crops,
)


def test_full_grid_spans_minus_one_to_one_with_step_two_over_r_minus_one():
    g = coordinate_grid(5, 9)
    assert g.shape == (2, 5, 9)
    assert torch.equal(g[0, 0], torch.linspace(-1, 1, 9))  # x runs along the width
    assert torch.equal(g[1, :, 0], torch.linspace(-1, 1, 5))  # y runs along the height
    assert g[0].min() == -1 and g[0].max() == 1 and g[1].min() == -1 and g[1].max() == 1
    assert torch.allclose(g[0, 3, 1:] - g[0, 3, :-1], torch.full((8,), 2 / 8))


def test_crop_corners_carry_their_slice_of_the_full_grid():
    full = coordinate_grid(8, 8)
    tops, lefts = torch.tensor([0, 4, 2]), torch.tensor([0, 4, 3])
    c = crop_coordinates(tops, lefts, 4, 4, 8, 8)
    assert c.shape == (3, 2, 4, 4)
    for i in range(3):
        t, l_ = int(tops[i]), int(lefts[i])
        assert torch.equal(c[i], full[:, t : t + 4, l_ : l_ + 4])
    assert c[0, 0, 0, 0] == -1 and c[0, 1, 0, 0] == -1  # top-left crop starts at the corner
    assert c[1, 0, -1, -1] == 1 and c[1, 1, -1, -1] == 1  # bottom-right crop ends at the corner
    assert math.isclose(float(c[2, 0, 0, 0]), 2 * 3 / 7 - 1, rel_tol=1e-6)


def test_sampling_grid_equals_training_grid_of_a_full_size_crop():
    lat = torch.randn(2, 4, 6, 10)
    crops, coords = random_crops(lat, 6, 10, torch.Generator().manual_seed(0))
    assert torch.equal(crops, lat)
    assert torch.equal(coords, full_coordinates(2, 6, 10))


def test_random_crops_gather_the_content_at_their_coordinates():
    h, w = 8, 12
    lat = torch.randn(16, 3, h, w)
    crops, coords = random_crops(lat, 4, 6, torch.Generator().manual_seed(1))
    assert crops.shape == (16, 3, 4, 6) and coords.shape == (16, 2, 4, 6)
    for i in range(16):
        left = round((float(coords[i, 0, 0, 0]) + 1) * (w - 1) / 2)
        top = round((float(coords[i, 1, 0, 0]) + 1) * (h - 1) / 2)
        assert torch.equal(crops[i], lat[i, :, top : top + 4, left : left + 6])
    positions = {(float(coords[i, 0, 0, 0]), float(coords[i, 1, 0, 0])) for i in range(16)}
    assert len(positions) > 4  # each sample gets its own place


def test_crops_of_latents_of_one_shape_take_exactly_the_single_shape_draws():
    """One crop function for every store: latents of one shape get crop_offsets' draws, so the batches of a
    single-shape store are what they were before it shared a path with aspect buckets."""
    for multiple in (1, 2):
        mixed = crop_offsets_within(torch.full((9,), 12), torch.full((9,), 10), 4, 6,
                                    torch.Generator().manual_seed(5), multiple)
        plain = crop_offsets(9, 12, 10, 4, 6, torch.Generator().manual_seed(5), multiple)
        assert all(torch.equal(a, b) for a, b in zip(mixed, plain))


def test_crop_larger_than_latent_is_refused():
    with pytest.raises(UserError, match="larger than the latent"):
        random_crops(torch.zeros(1, 4, 8, 8), 16, 16)


def schedule(h: int, w: int, batch: int, *, seed: int = 0, multiple_of: int = 1, **patches) -> PatchSchedule:
    cfg = PatchConfig(**patches)
    cfg.check()
    return PatchSchedule(cfg, h, w, batch, multiple_of, seed)


def test_latent_default_schedule_frequencies_and_batch_multipliers():
    s = schedule(32, 32, 8, real_p=0.5, sizes=[0.5], seed=3)
    assert [(st.height, st.prob, st.batch_size) for st in s.stages] == [(16, 0.5, 16), (32, 0.5, 8)]
    draws = [s.draw(i).height for i in range(4000)]
    assert abs(draws.count(32) / 4000 - 0.5) < 0.03


def test_pixel_schedule_of_the_paper():
    p = 0.5
    s = schedule(64, 64, 4, real_p=p, sizes=[0.25, 0.5], size_weights=[2, 3], seed=0)
    assert [st.height for st in s.stages] == [16, 32, 64]
    assert [st.batch_size for st in s.stages] == [16, 8, 4]
    assert [st.prob for st in s.stages] == pytest.approx([(1 - p) * 2 / 5, (1 - p) * 3 / 5, p])
    n = 6000
    draws = [s.draw(i).height for i in range(n)]
    for st in s.stages:
        assert abs(draws.count(st.height) / n - st.prob) < 0.025


def test_draw_is_a_function_of_seed_and_step_only():
    a = schedule(16, 16, 4, seed=7)
    b = schedule(16, 16, 4, seed=7)
    assert [a.draw(i) for i in range(50)] == [b.draw(i) for i in reversed(range(50))][::-1]
    c = schedule(16, 16, 4, seed=8)
    assert [a.draw(i) for i in range(50)] != [c.draw(i) for i in range(50)]


def test_full_size_baseline_has_one_stage():
    s = schedule(16, 16, 4, real_p=1.0)
    assert [(st.height, st.prob) for st in s.stages] == [(16, 1.0)]


def test_non_square_latents_get_proportional_patches():
    s = schedule(16, 32, 2, sizes=[0.5])
    assert [(st.height, st.width) for st in s.stages] == [(8, 16), (16, 32)]


def test_patch_not_divisible_by_network_patch_size_is_refused():
    with pytest.raises(UserError, match="not divisible by the network's patch size 2"):
        schedule(10, 10, 4, sizes=[0.5], multiple_of=2)


def test_aligned_crop_offsets_lie_on_the_token_grid():
    """Offsets drawn in units of the token size: randint(0, (16 - 8) // 2 + 1) * 2 for a 2-pixel DiT patch."""
    lat = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16).repeat(32, 1, 1, 1)
    g = torch.Generator().manual_seed(3)
    expected_tops = torch.randint(0, 5, (64,), generator=g) * 2
    expected_lefts = torch.randint(0, 5, (64,), generator=g) * 2
    crops, coords = random_crops(lat, 8, 8, torch.Generator().manual_seed(3), multiple=2)
    tops = ((coords[:, 1, 0, 0] + 1) * 15 / 2).round().long()
    lefts = ((coords[:, 0, 0, 0] + 1) * 15 / 2).round().long()
    assert torch.equal(tops, expected_tops) and torch.equal(lefts, expected_lefts)
    assert set(tops.tolist()) == {0, 2, 4, 6, 8} and set(lefts.tolist()) == {0, 2, 4, 6, 8}
    assert all(torch.equal(crops[i], lat[i, :, t:t + 8, l_:l_ + 8]) for i, (t, l_) in enumerate(zip(tops, lefts)))
    _, unaligned = random_crops(lat, 8, 8, torch.Generator().manual_seed(3))  # multiple 1: any offset
    assert ((unaligned[:, 1, 0, 0] + 1) * 15 / 2).round().long().remainder(2).any()


def test_an_aligned_crop_gets_exactly_its_slice_of_the_full_grid_position_embedding():
    from latentpatch.models.embeddings import CoordinatePositionEmbedding

    embed = CoordinatePositionEmbedding(32, patch_size=2)
    full = embed(full_coordinates(1, 16, 16)).reshape(8, 8, 32)
    top, left = 4, 6  # latent pixels: tokens (2, 3)
    crop = embed(crop_coordinates(torch.tensor([top]), torch.tensor([left]), 8, 8, 16, 16)).reshape(4, 4, 32)
    torch.testing.assert_close(crop, full[2:6, 3:7], rtol=0, atol=1e-6)


def test_sides_given_beside_real_p_1_are_refused_also_when_built_in_python():
    with pytest.raises(UserError, match="patches.real_p=1 trains on full-size latents only"):
        PatchConfig(real_p=1.0, sizes=[0.5]).check()  # the default side, given: a typo, not silently dropped
    assert PatchConfig(real_p=1.0).sizes == [] and PatchConfig().sizes == [0.5]
    PatchConfig(real_p=1.0).check()


def test_longer_side_scale_spans_the_longer_axis_to_one_and_the_shorter_to_its_aspect():
    g = coordinate_grid(4, 8, scale="longer-side")  # H 4, W 8
    assert torch.allclose(g[0, 0], torch.tensor([2 * k / 7 - 1 for k in range(8)]), atol=1e-7)
    assert torch.allclose(g[1, :, 0], torch.tensor([-3 / 7, -1 / 7, 1 / 7, 3 / 7]), atol=1e-7)
    assert torch.equal(coordinate_grid(8, 8, scale="longer-side"), coordinate_grid(8, 8))  # square: the same grid


def test_new_runs_default_to_the_longer_side_grid():
    assert PatchConfig().coordinate_scale == "longer-side"


def test_crops_of_images_of_different_shapes_carry_their_own_images_grid_slice():
    tops, lefts = torch.tensor([0, 2, 1]), torch.tensor([3, 0, 1])
    heights, widths = torch.tensor([4, 8, 6]), torch.tensor([8, 4, 6])
    for scale in ("per-axis", "longer-side"):
        coords = crop_coordinates(tops, lefts, 2, 3, heights, widths, scale=scale)
        for i in range(3):
            h, w, t, l_ = int(heights[i]), int(widths[i]), int(tops[i]), int(lefts[i])
            assert torch.equal(coords[i], coordinate_grid(h, w, scale=scale)[:, t:t + 2, l_:l_ + 3])
