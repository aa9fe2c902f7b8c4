"""The latent store on its own: manifest checks, shard writer, reader, dataset draws, rank sharding."""

import json

import pytest
import torch

from latentpatch.data.manifest import Item, Manifest, read_manifest, write_manifest
from latentpatch.data.store import LatentDataset, LatentStore, StoreWriter, shard_indices
from latentpatch.errors import UserError

PIXEL = {"kind": "pixel", "source": "pixel", "revision": None, "latent_channels": 3, "factor": 1,
         "scaling_factor": 1.0, "shift_factor": 0.0}
KL = {**PIXEL, "kind": "kl", "source": "/vae", "revision": "ab" * 32, "latent_channels": 2, "factor": 2}


def new_manifest(stores_std=True, dtype="float32"):
    info = KL if stores_std else PIXEL
    return Manifest(autoencoder=info, resolution=[8, 8], latent_shape=[info["latent_channels"], 4, 4] if stores_std
                    else [3, 8, 8], dtype=dtype, stores_std=stores_std)


def items(n, start=0):
    return [Item(f"f{i}.png", f"{i:064x}", f"caption {i}", False, -1, -1) for i in range(start, start + n)]


def write_store(path, mean, std=None, shard_size=3, background=True, extra=None):
    m = new_manifest(stores_std=std is not None)
    writer = StoreWriter(path, m, shard_size, background=background)
    for lo in range(0, len(mean), 2):  # batches of 2 rows, shards of 3: batches straddle shard ends
        t = {"mean": mean[lo:lo + 2]}
        if std is not None:
            t["std"] = std[lo:lo + 2]
        if extra is not None:
            t["text_pooled"] = extra[lo:lo + 2]
        writer.add(t, items(len(t["mean"]), lo))
    writer.close()
    return m


def test_writer_and_reader_round_trip_rows_in_item_order(tmp_path):
    mean, std = torch.randn(7, 2, 4, 4), torch.rand(7, 2, 4, 4)
    extra = torch.randn(7, 5)
    write_store(tmp_path, mean, std, extra=extra)
    store = LatentStore(tmp_path)
    assert len(store) == 7 and store.latent_shape == (2, 4, 4) and store.resolution == (8, 8)
    assert [s.file for s in store.meta.shards] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert [s.count for s in store.meta.shards] == [4, 3]  # a shard closes after the batch that fills it
    loaded = store.load()
    assert torch.equal(loaded["mean"], mean) and torch.equal(loaded["std"], std)
    assert torch.equal(loaded["text_pooled"], extra)
    assert store.captions == [f"caption {i}" for i in range(7)]
    picked = store.load([6, 0, 5])
    assert torch.equal(picked["mean"], mean[[6, 0, 5]])
    store.verify()
    assert store.manifest["count"] == 7 and store.info.kind == "kl"


def test_dropped_items_are_not_loaded_and_indices_follow_the_manifest(tmp_path):
    mean = torch.randn(5, 3, 8, 8)
    m = write_store(tmp_path, mean, background=False)
    m.items = [m.items[i] for i in (4, 1, 2)]  # e.g. stale rows of changed files dropped
    write_manifest(tmp_path, m)
    assert torch.equal(LatentStore(tmp_path).load()["mean"], mean[[4, 1, 2]])


def test_manifest_round_trips_and_keeps_unknown_keys(tmp_path):
    m = write_store(tmp_path, torch.randn(2, 3, 8, 8))
    d = json.loads((tmp_path / "manifest.json").read_text())
    assert {"format_version", "autoencoder", "resolution", "latent_shape", "dtype", "stores_std", "count",
            "text_encoder", "shards", "items"} <= set(d)
    assert d["items"][1] == {"file": "f1.png", "sha256": f"{1:064x}", "caption": "caption 1", "flip": False,
                             "shard": 0, "row": 1, "size": None, "mtime_ns": None, "label": None}
    d["future_field"] = {"x": 1}
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    again = read_manifest(tmp_path)
    write_manifest(tmp_path, again)
    assert json.loads((tmp_path / "manifest.json").read_text())["future_field"] == {"x": 1}
    assert again.count == m.count == 2


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: d.pop("latent_shape"), "missing field 'latent_shape'"),
        (lambda d: d["shards"][0].update(file="../../etc/passwd"), "is not shard-NNNNN.safetensors"),
        (lambda d: d["items"][0].update(row=9), "row 9, which does not exist"),
        (lambda d: d.update(count=5), "count 5 does not match"),
        (lambda d: d.update(format_version=99), "format_version 99"),
        (lambda d: d.update(dtype="int8"), "dtype 'int8'"),
        (lambda d: d.update(skipped=[{"file": "a.png"}]), "skipped entry"),
    ],
)
def test_corrupt_manifests_are_user_errors(tmp_path, corrupt, message):
    write_store(tmp_path, torch.randn(2, 3, 8, 8))
    d = json.loads((tmp_path / "manifest.json").read_text())
    corrupt(d)
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match=message):
        LatentStore(tmp_path)


def test_missing_store_manifest_json_or_shard_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        LatentStore(tmp_path / "nope")
    with pytest.raises(UserError, match="has no manifest.json"):
        LatentStore(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="could not read"):
        LatentStore(tmp_path)
    write_store(tmp_path, torch.randn(2, 3, 8, 8))
    (tmp_path / "shards" / "shard-00000.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="could not read shard"):
        LatentStore(tmp_path).load()
    with pytest.raises(UserError, match="differs from the manifest's sha256"):
        LatentStore(tmp_path).verify()


def test_dataset_draws_fresh_latents_from_mean_and_std(tmp_path):
    mean, std = torch.randn(4, 2, 4, 4), torch.full((4, 2, 4, 4), 0.5)
    write_store(tmp_path, mean, std)
    ds = LatentDataset(tmp_path, seed=3)
    first, again = ds[1]["latent"], ds[1]["latent"]
    assert torch.equal(first, again)  # one (epoch, index): one draw, whatever the order of reads
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["latent"], first)  # a new epoch: a fresh latent
    draws = torch.stack([(ds.set_epoch(e), ds[1]["latent"])[1] for e in range(2000)])
    torch.testing.assert_close(draws.mean(0), mean[1], atol=0.06, rtol=0)  # 4 sigma of the mean of 2000
    torch.testing.assert_close(draws.std(0), std[1], atol=0.05, rtol=0)
    batch = ds.batch(torch.tensor([1] * 2000), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch.mean(0), mean[1], atol=0.06, rtol=0)
    item = ds[2]
    assert item["caption"] == "caption 2" and item["index"] == 2 and item["latent"].dtype == torch.float32


def test_dataset_without_std_returns_the_stored_latent_and_keeps_store_indices(tmp_path):
    mean = torch.randn(5, 3, 8, 8)
    write_store(tmp_path, mean)
    ds = LatentDataset(tmp_path, indices=shard_indices(5, 1, 2))
    assert len(ds) == 2 and [ds[i]["index"] for i in range(2)] == [1, 3]
    assert torch.equal(ds[1]["latent"], mean[3]) and torch.equal(ds.batch([0, 1]), mean[[1, 3]])


def test_shard_indices_split_disjointly_and_cover_everything():
    parts = [shard_indices(10, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(parts, [])) == list(range(10))
    with pytest.raises(UserError, match="rank 3 is not within a world of 3"):
        shard_indices(10, 3, 3)


def test_writer_refuses_batches_whose_tensor_names_change(tmp_path):
    writer = StoreWriter(tmp_path, new_manifest(), 10, background=False)
    writer.add({"mean": torch.zeros(1, 2, 4, 4), "std": torch.ones(1, 2, 4, 4)}, items(1))
    with pytest.raises(ValueError, match="tensor names changed"):
        writer.add({"mean": torch.zeros(1, 2, 4, 4)}, items(1))
