"""Training on aspect buckets (issue 23): a full-size step takes one bucket at a time, in proportion to its rows;
a patch step mixes buckets in one batch of equal square crops, each cut within its own latent and carrying its
own image's grid; everything is drawn from (seed, step, micro) for the whole batch, so resume and N processes
repeat one run; run.json and checkpoints record the shapes; held-out loss is scored and reported per bucket."""

import json

import pytest
import torch
from helpers import photo, save_image, train_two_processes
from trainer_helpers import assert_same_weights, tiny_overrides

import latentpatch as lp
from latentpatch.checkpoints import read_state
from latentpatch.conditioning import ConditioningSpec
from latentpatch.config import load_config
from latentpatch.data.store import LatentStore
from latentpatch.diffusion.edm import EDMConfig, EDMObjective
from latentpatch.errors import UserError
from latentpatch.metrics.denoising import HeldoutSet, denoising_loss, run_denoising_loss
from latentpatch.patches import PatchStage, coordinate_grid, crop_offsets_within
from latentpatch.runs import load_run
from latentpatch.seeding import make_generator
from latentpatch.training.batches import BatchSpec, draw_batch
from latentpatch.training.rows import TrainingRows
from latentpatch.training.trainer import train

CPU = torch.device("cpu")
SHAPES = [(6, 10), (8, 8), (10, 6)]  # latent (h, w) of three buckets; the nominal square is 8x8
COUNTS = [2, 6, 4]
FULL, CROP = PatchStage(8, 8, 0.5, 4), PatchStage(4, 4, 0.5, 8)


def item_latent(item: int, h: int, w: int, c: int = 3) -> torch.Tensor:
    """[c, h, w] whose every value names its place: item * 10000 + channel * 1000 + row * 100 + column."""
    ch, y, x = torch.meshgrid(torch.arange(c), torch.arange(h), torch.arange(w), indexing="ij")
    return (item * 10000 + ch * 1000 + y * 100 + x).float()


def memory_rows(held=None, std: bool = False, labels: bool = False):
    """A BucketedRows of 12 items in manifest order 0..11, bucket by bucket interleaved, from in-memory tensors;
    returns (rows, bucket_of [12], the items' latents)."""
    bucket_of = torch.tensor([1, 0, 1, 2, 1, 1, 2, 0, 1, 2, 2, 1])
    assert torch.bincount(bucket_of).tolist() == COUNTS
    latents = [item_latent(i, *SHAPES[int(b)]) for i, b in enumerate(bucket_of)]
    per_bucket = []
    for b in range(3):
        members = (bucket_of == b).nonzero().flatten().tolist()
        part = {"mean": torch.stack([latents[i] for i in members])}
        if std:
            part["std"] = torch.ones_like(part["mean"])
        per_bucket.append(part)
    cond = {"labels": torch.arange(12)} if labels else {}
    held = None if held is None else torch.tensor(held)
    return TrainingRows.split(per_bucket, bucket_of, cond, held, (8, 8)), bucket_of, latents


def spec(scale: str = "per-axis", multiple: int = 1, classes: int = 0) -> BatchSpec:
    return BatchSpec(seed=7, objective=EDMObjective(EDMConfig()), conditioning=ConditioningSpec(num_classes=classes),
                     label_dropout=0.0, caption_dropout=0.0, crop_multiple=multiple, coordinate_scale=scale)


def draw(rows, stage, step, batch=8, micro=0, rank=0, world=1, **spec_kw):
    return draw_batch(rows, spec(**spec_kw), stage, batch, step, micro, rank, world, CPU)


def test_full_size_steps_take_one_bucket_at_a_time_in_proportion_to_its_rows():
    rows, bucket_of, latents = memory_rows()
    chosen = [rows.full_size_bucket(7, step, 0) for step in range(3000)]
    for step in range(3):  # the contract's generator: seeded by (seed, step, micro) alone
        g = make_generator("cpu", 7, step, 0, "bucket")
        assert chosen[step] == int(torch.multinomial(torch.tensor(COUNTS, dtype=torch.float64), 1, generator=g))
    shares = torch.bincount(torch.tensor(chosen), minlength=3) / 3000
    torch.testing.assert_close(shares, torch.tensor(COUNTS) / 12, atol=0.03, rtol=0)
    for step in range(12):
        b = draw(rows, FULL, step)
        h, w = SHAPES[chosen[step]]
        assert b.x0.shape == (8, 3, h, w) and b.noise.shape == (8, 3, h, w)
        assert torch.equal(b.coords, coordinate_grid(h, w).expand(8, 2, h, w))
        items = (b.x0[:, 0, 0, 0] // 10000).long()
        assert (bucket_of[items] == chosen[step]).all()  # every row from the chosen bucket, whole
        assert all(torch.equal(b.x0[k], latents[i]) for k, i in enumerate(items.tolist()))


@pytest.mark.parametrize("scale", ["per-axis", "longer-side"])
def test_a_crop_carries_its_own_images_grid_slice_and_values_at_an_offset_within_its_own_bounds(scale):
    rows, bucket_of, latents = memory_rows()
    tops_seen = {s: set() for s in SHAPES}
    lefts_seen = {s: set() for s in SHAPES}
    for step in range(20):
        b = draw(rows, CROP, step, batch=32, scale=scale)
        indices = torch.randint(0, 12, (32,), generator=make_generator("cpu", 7, step, 0, "indices"))
        assert b.x0.shape == (32, 3, 4, 4) and b.coords.shape == (32, 2, 4, 4)
        for k in range(32):
            corner = int(b.x0[k, 0, 0, 0])
            item, top, left = corner // 10000, corner % 1000 // 100, corner % 100
            assert item == int(indices[k])  # rows drawn from all training rows, in training order
            h, w = SHAPES[int(bucket_of[item])]
            assert 0 <= top <= h - 4 and 0 <= left <= w - 4
            assert torch.equal(b.x0[k], latents[item][:, top:top + 4, left:left + 4])
            assert torch.equal(b.coords[k], coordinate_grid(h, w, top, left, 4, 4, scale=scale))
            tops_seen[(h, w)].add(top)
            lefts_seen[(h, w)].add(left)
    # each bucket's offsets reach its own bounds, not the smallest bucket's
    assert {s: max(t) for s, t in tops_seen.items()} == {(6, 10): 2, (8, 8): 4, (10, 6): 6}
    assert {s: max(v) for s, v in lefts_seen.items()} == {(6, 10): 6, (8, 8): 4, (10, 6): 2}


def test_crop_offsets_within_keep_each_sample_in_its_own_latent_on_the_token_grid():
    g = torch.Generator().manual_seed(0)
    heights, widths = torch.tensor([6, 10] * 200), torch.tensor([10, 6] * 200)
    tops, lefts = crop_offsets_within(heights, widths, 4, 4, g, multiple=2)
    assert set(tops[0::2].tolist()) == {0, 2} and set(tops[1::2].tolist()) == {0, 2, 4, 6}
    assert set(lefts[0::2].tolist()) == {0, 2, 4, 6} and set(lefts[1::2].tolist()) == {0, 2}
    with pytest.raises(UserError, match="patch 8x8 is larger than the latent 6x10"):
        crop_offsets_within(torch.tensor([8, 6]), torch.tensor([8, 10]), 8, 8, g)


@pytest.mark.parametrize("stage", [FULL, CROP], ids=["full-size", "crops"])
def test_draws_repeat_for_the_same_seed_step_and_micro_and_two_ranks_split_one_batch(stage):
    rows, _, _ = memory_rows(std=True)
    one, again = draw(rows, stage, 5, micro=1), draw(rows, stage, 5, micro=1)
    halves = [draw(rows, stage, 5, micro=1, rank=r, world=2) for r in range(2)]
    for field in ("x0", "coords", "sigma", "noise"):
        assert torch.equal(getattr(one, field), getattr(again, field))
        assert torch.equal(getattr(one, field), torch.cat([getattr(h, field) for h in halves]))
    assert not torch.equal(one.noise, draw(rows, stage, 5, micro=0).noise)


def test_a_patch_step_cuts_its_crop_from_a_posterior_sample_of_the_whole_latent():
    """The posterior noise is drawn at the largest sides of the batch's latents and each row takes its own latent's
    corner of it, then the crop: a store of one shape draws exactly as a single-shape store always did."""
    rows, bucket_of, latents = memory_rows(std=True)  # std 1: x0 = the crop of (the mean + eps)
    b = draw(rows, CROP, 3)
    items = torch.randint(0, 12, (8,), generator=make_generator("cpu", 7, 3, 0, "indices"))
    sides = torch.tensor(SHAPES)[bucket_of[items]]
    g = make_generator(CPU, 7, 3, 0, "batch")
    eps = torch.randn((8, 3, *sides.max(0).values.tolist()), generator=g)  # the batch's first draw
    tops, lefts = crop_offsets_within(sides[:, 0], sides[:, 1], 4, 4, g)
    for k, item in enumerate(items.tolist()):
        (h, w), t, l_ = SHAPES[int(bucket_of[item])], int(tops[k]), int(lefts[k])
        whole = latents[item] + eps[k, :, :h, :w]
        assert torch.equal(b.x0[k], whole[:, t:t + 4, l_:l_ + 4])


def test_held_out_rows_are_never_drawn_and_each_row_keeps_its_own_conditioning():
    rows, bucket_of, _ = memory_rows(held=[1, 3, 4], labels=True)
    assert rows.counts.tolist() == [1, 5, 3] and len(rows) == 9
    for stage in (FULL, CROP):
        for step in range(10):
            b = draw(rows, stage, step, classes=12)
            items = (b.x0[:, 0, 0, 0] // 10000).long()
            assert not set(items.tolist()) & {1, 3, 4}
            assert torch.equal(b.cond.class_labels, items)  # label i is item i's


# --- end to end, on stores written by `encode --buckets` (pixel autoencoder: the latents are the pixels) -------

# --resolution 16, step 2: 48x32 photos go to the 12x20 bucket, 32x48 to 20x12, squares to 16x16
KINDS = {"land": ((48, 32), 5), "port": ((32, 48), 3), "square": ((36, 36), 3)}
BUCKETS = [[20, 12], [16, 16], [12, 20]]  # latent [h, w], tallest first


def mixed_store(root, kinds=KINDS, offset=0):
    src = root / "images"
    k = offset
    for name, (size, count) in kinds.items():
        for i in range(count):
            save_image(photo(k, size), src / f"{name}{i}.png")
            k += 1
    lp.encode(src, root / "store", "pixel", 16, workers=0, buckets=True)
    return root / "store"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return mixed_store(tmp_path_factory.mktemp("buckets"))


def tiny(**extra):
    return load_config("tiny", tiny_overrides(**{"train.max_steps": 8, "train.log_every": 2, **extra}))


def test_a_tiny_dit_trains_on_a_bucketed_store_and_records_its_shapes(store, tmp_path):
    steps = []
    result = train(tiny(**{"train.sample_every": 8}), store, tmp_path / "run", progress=False, device="cpu",
                   callback=lambda info: steps.append((info.patch, info.batch_size)))
    shapes = [patch for patch, _ in steps]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["buckets"] == BUCKETS
    assert info["latent_shape"] == [3, 12, 20]  # the most common bucket's: the default sampling shape
    assert info["store"]["latent_shape"] == [3, 16, 16]  # the store's nominal square
    state = read_state(result.checkpoint)
    assert state["buckets"] == BUCKETS and state["latent_shape"] == [3, 12, 20]
    full = {tuple(s) for s in shapes} - {(8, 8)}
    assert full and full <= {tuple(b) for b in BUCKETS}  # full-size steps train at their bucket's shape
    assert (8, 8) in {tuple(s) for s in shapes}  # and crops (half the 16 side) mix the buckets
    # a full-size step counts its batch as whole images; an 8x8 crop is a quarter of the 16x16 area's image
    assert state["nimg"] == sum(b if p != (8, 8) else b * 64 / 256 for p, b in steps)
    assert (tmp_path / "run" / "samples" / "step-00000008.png").is_file()  # previews at the run's shape
    assert result.loss is not None and torch.isfinite(torch.tensor(result.loss))
    assert load_run(tmp_path / "run").step == 8


def test_a_stopped_and_resumed_bucketed_run_equals_an_uninterrupted_one(store, tmp_path):
    cfg = {"train.max_steps": 10, "train.ckpt_every": 4}
    whole = train(tiny(**cfg), store, tmp_path / "whole", progress=False, device="cpu")
    train(tiny(**cfg), store, tmp_path / "split", max_steps=5, progress=False, device="cpu")
    resumed = train(tiny(**cfg), store, tmp_path / "split", resume=True, progress=False, device="cpu")
    assert resumed.step == whole.step == 10
    assert_same_weights(whole.checkpoint, resumed.checkpoint)


def test_two_gloo_processes_train_a_bucketed_store_as_one_does(store, tmp_path):
    steps = {"train.max_steps": 4, "train.ckpt_every": 100, "train.log_every": 2}
    one = train(load_config("tiny", tiny_overrides(**steps)), store, tmp_path / "one", progress=False, device="cpu")
    proc = train_two_processes(store, tmp_path / "two", tiny_overrides(**steps))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two" / "checkpoints" / "step-00000004"
    assert_same_weights(one.checkpoint, two, atol=1e-6)


def test_a_bucket_with_one_image_is_refused_before_anything_is_written(tmp_path):
    store = mixed_store(tmp_path, {"land": ((48, 32), 3), "port": ((32, 48), 1)})
    with pytest.raises(UserError) as e:
        train(tiny(), store, tmp_path / "run", progress=False, device="cpu")
    message = str(e.value)
    assert "\n" not in message
    assert "bucket 0 (20x12 px, height x width)" in message and "1 training image (port0.png)" in message
    assert "--bucket-step" in message
    assert not (tmp_path / "run" / "run.json").exists()


def test_a_crop_larger_than_a_buckets_shorter_side_is_refused_naming_the_bucket(store, tmp_path):
    with pytest.raises(UserError, match=r"14x14 crops .* larger than bucket 0's latent 20x12 .*patches.sizes"):
        train(tiny(**{"patches.sizes": "[0.875]"}), store, tmp_path / "run", progress=False, device="cpu")


def test_heldout_loss_is_scored_at_each_buckets_own_size_and_reported_per_bucket(store, tmp_path):
    held = mixed_store(tmp_path / "held", {"land": ((48, 32), 2), "square": ((36, 36), 1)}, offset=20)
    train(tiny(**{"heldout.latents": str(held), "heldout.every": 4}), store, tmp_path / "run", progress=False,
          device="cpu")
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "heldout_loss" in r]
    assert [r["step"] for r in evaluated] == [0, 4, 8]
    per_bucket = evaluated[-1]["heldout_per_bucket"]
    assert [(p["bucket"], p["latent"], p["images"]) for p in per_bucket] == [(0, [16, 16], 1), (1, [12, 20], 2)]
    assert evaluated[-1]["heldout_loss"] == pytest.approx(sum(p["mean"] * p["images"] for p in per_bucket) / 3,
                                                          rel=1e-12)
    # eval of the run on the same store agrees, and each bucket's figure is its images scored whole
    loaded = load_run(tmp_path / "run", checkpoint="latest")
    loss = run_denoising_loss(loaded, held)
    assert loss.mean == pytest.approx(evaluated[-1]["heldout_loss"], rel=1e-6)
    held_store = LatentStore(held)
    for part in loss.per_bucket:
        at = (held_store.bucket_of == part["bucket"]).nonzero().flatten()
        alone = HeldoutSet(held_store.load(at.tolist())["mean"], ids=at, sigma_data=loss.weight_sigma_data,
                           coordinate_scale=loaded.cfg.patches.coordinate_scale)
        assert denoising_loss(loaded.precond, alone).mean == pytest.approx(part["mean"], rel=1e-6)


def test_a_held_out_share_of_a_bucketed_store_is_scored_at_each_rows_own_bucket(store, tmp_path):
    result = train(tiny(**{"heldout.share": 0.2, "heldout.every": 8}), store, tmp_path / "run", progress=False,
                   device="cpu")
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    s = LatentStore(store)
    held = [i for i, item in enumerate(s.items) if item.file in info["heldout"]["files"]]
    buckets = s.bucket_of[held].tolist()
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    last = [r for r in records if "heldout_loss" in r][-1]
    assert last["step"] == 8 and last["heldout_loss"] == pytest.approx(result.heldout_loss, rel=1e-12)
    assert [(p["bucket"], p["images"]) for p in last["heldout_per_bucket"]] == \
        [(b, buckets.count(b)) for b in sorted(set(buckets))]
    ema = load_run(tmp_path / "run", checkpoint="latest").precond
    for part in last["heldout_per_bucket"]:  # each row scored whole at its own bucket's shape, its own noise
        at = torch.tensor([k for k, b in enumerate(buckets) if b == part["bucket"]])
        alone = HeldoutSet(s.load([held[k] for k in at])["mean"], ids=at, sigma_data=info["heldout"]["weight_sd"],
                           coordinate_scale="longer-side")  # the default of a new run
        assert alone.x0.shape[2:] == tuple(part["latent"])
        assert denoising_loss(ema, alone).mean == pytest.approx(part["mean"], rel=1e-6)


def test_compiled_bucketed_training_compiles_each_shape_once_and_never_again(store, tmp_path, monkeypatch):
    """torch.compile(dynamic=False) on a bucketed store: one static graph per shape a step takes (the crop and
    each bucket's full size), none after every shape has been seen (dynamo's counters)."""
    import functools

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # dynamo, not inductor
    seen = []
    train(tiny(**{"train.compile": "true", "train.max_steps": 24}), store, tmp_path / "run", progress=False,
          device="cpu", callback=lambda info: seen.append((info.patch, counters["stats"]["unique_graphs"])))
    shapes = {patch for patch, _ in seen}
    assert len(shapes) >= 3  # the crop and at least two buckets' full sizes
    warm = max(next(i for i, s in enumerate(seen) if s[0] == shape) for shape in shapes)
    assert seen[-1][1] == len(shapes) and all(s[1] == seen[warm][1] for s in seen[warm:])
    torch._dynamo.reset()
