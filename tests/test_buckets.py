"""Aspect-ratio buckets: the size rule, the nearest bucket, the kept share, and a bucketed store's manifest, writer
and reader (per-bucket rows, one shape per load)."""

import json

import pytest
import torch
from helpers import verify_store

from latentpatch.data.buckets import bucket_sizes, kept_share, nearest_bucket
from latentpatch.data.manifest import Item, Manifest, read_manifest, write_manifest
from latentpatch.data.store import LatentStore, StoreWriter
from latentpatch.errors import UserError

KL = {"kind": "kl", "source": "/vae", "revision": "ab" * 32, "latent_channels": 2, "factor": 2, "scaling_factor": 1.0,
      "shift_factor": 0.0}
SDXL_LIKE = [(1344, 768), (1216, 832), (1152, 896), (1088, 960), (1024, 1024), (960, 1088), (896, 1152), (832, 1216),
             (768, 1344)]


def test_bucket_sizes_follow_the_rule_for_64_px_in_steps_of_8():
    # s=40 gives 96 (aspect 2.4) and s=32 gives 128 (aspect 4): both beyond max_aspect 2
    assert bucket_sizes(64, 8, 2.0) == [(80, 48), (72, 56), (64, 64), (56, 72), (48, 80)]
    assert bucket_sizes(64, 8, 2.5) == [(96, 40), (80, 48), (72, 56), (64, 64), (56, 72), (48, 80), (40, 96)]
    assert bucket_sizes(64, 8, 1.0) == [(64, 64)]


def test_bucket_sizes_at_1024_px_in_steps_of_64_are_sdxl_like_and_fill_the_area_to_one_step():
    sizes = bucket_sizes(1024, 64, 2.0)
    assert sizes == SDXL_LIKE  # s=704 gives 1472: aspect 2.09, dropped
    for h, w in sizes:
        short, long = min(h, w), max(h, w)
        assert h % 64 == w % 64 == 0 and long <= 2 * short
        assert h * w <= 1024**2 < (long + 64) * short  # the long side is as long as the area allows, to one step


@pytest.mark.parametrize("resolution, step", [(16, 2), (64, 8), (256, 16), (512, 64), (96, 32)])
def test_the_square_is_always_a_bucket_and_the_list_runs_tallest_to_widest(resolution, step):
    sizes = bucket_sizes(resolution, step)
    assert (resolution, resolution) in sizes
    ratios = [h / w for h, w in sizes]
    assert ratios == sorted(ratios, reverse=True) and len(set(sizes)) == len(sizes)
    assert sizes == [(w, h) for h, w in reversed(sizes)]  # both orientations of each


def test_bucket_sizes_refuse_a_step_or_aspect_that_makes_no_buckets():
    with pytest.raises(UserError, match="max aspect >= 1"):
        bucket_sizes(64, 8, 0.5)
    with pytest.raises(UserError, match="step >= 1"):
        bucket_sizes(64, 0)


@pytest.mark.parametrize(
    "height, width, index",
    [
        (64, 96, 4),  # 3:2 landscape: 48x80 (3:5) keeps 0.9, 56x72 keeps 0.857
        (96, 64, 0),  # 2:3 portrait, the mirror
        (50, 50, 2),  # square
        (50, 200, 4),  # 4:1 goes to the widest bucket
        (200, 50, 0),
        (300, 340, 2),  # a close call: 64x64 keeps 0.8824 of it, 56x72 0.8815
        (30, 36, 3),  # 5:6 = 0.833: 56x72 (0.778) keeps 0.933, 64x64 keeps 0.833
    ],
)
def test_nearest_bucket_is_the_nearest_log_aspect_ratio(height, width, index):
    sizes = bucket_sizes(64, 8)
    assert nearest_bucket(height, width, sizes) == index


def test_a_tie_goes_to_the_larger_area_then_the_first():
    # a 2:1 portrait is as far from 4:1 as from 1:1 in log aspect (a factor 2 each way)
    assert nearest_bucket(100, 50, [(128, 32), (48, 48)]) == 0
    assert nearest_bucket(100, 50, [(48, 48), (128, 32)]) == 1
    assert nearest_bucket(40, 40, [(80, 48), (48, 80)]) == 0  # equal areas: the first
    assert nearest_bucket(40, 40, [(48, 80), (80, 48)]) == 0


def test_kept_share_is_the_ratio_of_the_aspect_ratios():
    assert kept_share(32, 48, (16, 16)) == 2 / 3  # a 3:2 image centre-cropped to a square keeps 2/3
    assert kept_share(48, 32, (64, 64)) == 2 / 3
    assert kept_share(64, 96, (48, 72)) == 1.0  # into its own 3:2 bucket: all of it
    assert kept_share(20, 80, (12, 20)) == 5 / 12  # 1:4 into 3:5: (1/4) / (3/5)
    assert kept_share(64, 96, (48, 80)) == 0.9


def manifest(buckets=None):
    return Manifest(autoencoder=KL, resolution=[8, 8], latent_shape=[2, 4, 4], dtype="float32", stores_std=False,
                    buckets=buckets, bucket_step=None if buckets is None else 2,
                    max_aspect=None if buckets is None else 2.0)


def item(i, image_size=None):
    return Item(f"f{i}.png", f"{i:064x}", None, False, -1, -1, image_size=image_size)


# (bucket pixel size, item number): the items of three buckets, interleaved as encode meets them
ROWS = [((6, 10), 0), ((8, 8), 1), ((10, 6), 2), ((8, 8), 3), ((6, 10), 4), ((8, 8), 5), ((8, 8), 6), ((10, 6), 7)]


def latent(size, i):
    h, w = size
    return torch.full((1, 2, h // 2, w // 2), float(i))


def write_bucketed(path, shard_size=3):
    m = manifest(buckets=[])
    writer = StoreWriter(path, m, shard_size, background=True)
    for size, i in ROWS:
        writer.add({"mean": latent(size, i), "text_pooled": torch.tensor([[float(i)]])}, [item(i, [size[0], size[1]])],
                   size)
    writer.close()
    return m


def test_a_bucketed_store_lists_its_buckets_tallest_first_and_each_shard_holds_one(tmp_path):
    write_bucketed(tmp_path)
    store = LatentStore(tmp_path)
    assert store.buckets == [(10, 6), (8, 8), (6, 10)]  # in bucket_sizes order, whatever order they came in
    assert store.bucket_latent_shapes == [(2, 5, 3), (2, 4, 4), (2, 3, 5)]
    assert store.latent_shape == (2, 4, 4) and store.resolution == (8, 8)  # nominal: the square of the area
    assert [i.file for i in store.items] == [f"f{i}.png" for i in (0, 1, 3, 2, 5, 6, 4, 7)]  # as shards were written
    assert store.bucket_of.tolist() == [2, 1, 1, 0, 1, 1, 2, 0]
    assert store.bucket_counts == [2, 4, 2] and store.most_common_bucket == 1
    for shard in store.manifest.shards:
        assert {i.bucket for i in store.items if store.manifest.shards[i.shard] is shard} == {shard.bucket}
    # never more than shard_size rows buffered: a full total flushes the fullest bucket (a tie: the oldest buffer)
    assert [(s.bucket, s.count) for s in store.manifest.shards] == [(2, 1), (1, 2), (0, 1), (1, 2), (2, 1), (0, 1)]
    verify_store(store)


def test_bucket_rows_hold_each_buckets_items_in_manifest_order(tmp_path):
    write_bucketed(tmp_path)
    store = LatentStore(tmp_path)
    rows = store.bucket_rows(("mean", "std"))  # no std stored: only mean
    assert [sorted(r) for r in rows] == [["mean"]] * 3
    number = [int(i.file[1:-4]) for i in store.items]
    for b, r in enumerate(rows):
        mine = [n for n, k in zip(number, store.bucket_of.tolist()) if k == b]
        assert r["mean"].shape == (len(mine), *store.bucket_latent_shapes[b])
        assert r["mean"].materialize()[:, 0, 0, 0].tolist() == mine  # row k: the bucket's k-th item
    text = store.bucket_rows(("text_pooled",))
    assert [t["text_pooled"].materialize().flatten().tolist() for t in text] == [[2.0, 7.0], [1.0, 3.0, 5.0, 6.0],
                                                                                   [0.0, 4.0]]


def test_load_takes_indices_of_one_bucket_and_names_the_shapes_otherwise(tmp_path):
    write_bucketed(tmp_path)
    store = LatentStore(tmp_path)
    picked = store.load([5, 1, 4])  # all in bucket 1 (8x8 px)
    assert picked["mean"].shape == (3, 2, 4, 4) and picked["mean"][:, 0, 0, 0].tolist() == [6.0, 1.0, 5.0]
    with pytest.raises(UserError, match=r"items 0 and 1 are latents of different shapes, \[2, 3, 5\] and \[2, 4, 4\]"):
        store.load([0, 1])
    with pytest.raises(UserError, match="different shapes"):
        store.load()
    assert store.load([0, 3, 5], names=("text_pooled",))["text_pooled"].flatten().tolist() == [0.0, 2.0, 6.0]
    assert store.load([], names=("mean",))["mean"].shape == (0, 2, 4, 4)
    with pytest.raises(UserError, match="holds 3 aspect buckets of different shapes; read it one bucket at a time"):
        store.rows()


def test_a_single_shape_store_is_one_bucket(tmp_path):
    m = manifest()
    writer = StoreWriter(tmp_path, m, 4, background=False)
    writer.add({"mean": torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 4, 4).contiguous()}, [item(i) for i in range(3)])
    writer.close()
    store = LatentStore(tmp_path)
    assert store.buckets is None and store.bucket_latent_shapes == [(2, 4, 4)]
    assert store.bucket_of.tolist() == [0, 0, 0] and store.bucket_counts == [3] and store.most_common_bucket == 0
    rows = store.bucket_rows()
    assert len(rows) == 1 and torch.equal(rows[0]["mean"].materialize(), store.rows()["mean"].materialize())
    d = json.loads((tmp_path / "manifest.json").read_text())
    assert not {"buckets", "bucket_step", "max_aspect"} & set(d)
    assert "bucket" not in d["shards"][0] and not {"bucket", "image_size"} & set(d["items"][0])
    with pytest.raises(ValueError, match="need their bucket, and only those"):
        StoreWriter(tmp_path, m, 4).add({"mean": torch.zeros(1, 2, 4, 4)}, [item(9)], (8, 8))


def test_most_common_bucket_ties_go_to_the_one_nearest_square_then_the_first(tmp_path):
    m = manifest(buckets=[])
    writer = StoreWriter(tmp_path, m, 10, background=False)
    for size, i in [((10, 6), 0), ((6, 10), 1), ((10, 6), 2), ((6, 10), 3), ((8, 8), 4)]:
        writer.add({"mean": latent(size, i)}, [item(i)], size)
    writer.close()
    store = LatentStore(tmp_path)
    assert store.bucket_counts == [2, 1, 2] and store.most_common_bucket == 0  # 10x6 and 6x10 equally far from square
    m.items += [Item("g.png", "e" * 64, None, False, m.items[-1].shard, m.items[-1].row, bucket=m.items[-1].bucket)]
    write_manifest(tmp_path, m)  # the square one as often: it wins
    assert LatentStore(tmp_path).bucket_counts == [2, 2, 2] and LatentStore(tmp_path).most_common_bucket == 1


def test_a_bucketed_manifest_round_trips_and_its_consistency_is_checked(tmp_path):
    m = write_bucketed(tmp_path)
    again = read_manifest(tmp_path)
    assert again.to_dict() == m.to_dict() and again.buckets == [[10, 6], [8, 8], [6, 10]]
    assert (again.bucket_step, again.max_aspect) == (2, 2.0)
    d = json.loads((tmp_path / "manifest.json").read_text())
    assert d["items"][0]["image_size"] == [6, 10] and d["shards"][0]["bucket"] == 2
    for corrupt, message in [
        (lambda d: d["items"][0].update(bucket=0), "is in bucket 0 but its shard shard-00000.safetensors holds bucket 2"),
        (lambda d: d["shards"][0].update(bucket=3), "names bucket 3; the manifest has 3"),
        (lambda d: d.update(buckets=[[10, 6], [8, 8], [8, 8]]), "name a size twice"),
        (lambda d: d.update(buckets=[[10, 6], [8, 8], [6, 9]]), r"bucket \[6, 9\] is not an \[H, W\]"),
        (lambda d: d.pop("buckets"), "names bucket 2 but the manifest has no buckets"),
    ]:
        bad = json.loads(json.dumps(d))
        corrupt(bad)
        (tmp_path / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(UserError, match=message):
            LatentStore(tmp_path)


def test_use_bucket_inserts_in_order_and_moves_later_indices_up():
    m = manifest(buckets=[[8, 8]])
    m.items = [Item("a.png", "a" * 64, None, False, 0, 0, bucket=0)]
    assert m.use_bucket((8, 8)) == 0 and m.use_bucket((6, 10)) == 1 and m.use_bucket((10, 6)) == 0
    assert m.buckets == [[10, 6], [8, 8], [6, 10]] and m.items[0].bucket == 1


def test_the_latent_std_of_a_bucketed_store_weighs_items_by_their_size():
    m = manifest(buckets=[[10, 6], [8, 8]])  # 15 and 16 latent pixels
    m.items = [Item("a.png", "a" * 64, None, False, 0, 0, moments=[0.0, 1.0], bucket=0),
               Item("b.png", "b" * 64, None, False, 0, 0, moments=[1.0, 5.0], bucket=1)]
    mean, second = 16 / 31, (15 + 16 * 5) / 31
    assert m.latent_std == pytest.approx((second - mean**2) ** 0.5, rel=1e-12)


def test_identity_includes_each_items_bucket():
    a, b = manifest(buckets=[[10, 6], [8, 8]]), manifest(buckets=[[10, 6], [8, 8]])
    a.items = [Item("a.png", "a" * 64, None, False, 0, 0, bucket=0)]
    b.items = [Item("a.png", "a" * 64, None, False, 0, 0, bucket=1)]
    plain = manifest()
    plain.items = [Item("a.png", "a" * 64, None, False, 0, 0)]
    assert len({a.identity, b.identity, plain.identity}) == 3


def test_an_empty_bucketed_store_says_so(tmp_path):
    write_manifest(tmp_path, manifest(buckets=[]))
    store = LatentStore(tmp_path)
    assert store.buckets == [] and store.bucket_counts == [] and len(store) == 0
    for read in (lambda: store.most_common_bucket, store.bucket_rows):
        with pytest.raises(UserError, match="is empty; encode some images first"):
            read()
