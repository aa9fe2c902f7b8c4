"""The latent store on its own: manifest checks, shard writer, reader, dataset draws, rank sharding."""

import json
from dataclasses import replace

import pytest
from helpers import verify_store
import torch

from latentpatch.conditioning import ConditioningSpec
from latentpatch.data.manifest import Item, Manifest, read_manifest, write_manifest
from latentpatch.data.rows import ShardedRows
from latentpatch.data.store import LatentStore, StoreWriter
from latentpatch.diffusion.edm import EDMConfig, EDMObjective
from latentpatch.errors import UserError
from latentpatch.patches import PatchStage
from latentpatch.seeding import make_generator
from latentpatch.training.batches import BatchSpec, draw_batch
from latentpatch.training.rows import TrainingRows

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
    assert [s.file for s in store.manifest.shards] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert [s.count for s in store.manifest.shards] == [4, 3]  # a shard closes after the batch that fills it
    loaded = store.load()
    assert torch.equal(loaded["mean"], mean) and torch.equal(loaded["std"], std)
    assert torch.equal(loaded["text_pooled"], extra)
    assert store.captions == [f"caption {i}" for i in range(7)]
    picked = store.load([6, 0, 5])
    assert torch.equal(picked["mean"], mean[[6, 0, 5]])
    verify_store(store)
    assert store.manifest.count == 7 and store.info.kind == "kl"


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
                             "shard": 0, "row": 1, "size": None, "mtime_ns": None, "label": None, "moments": None}
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


def test_training_batches_draw_fresh_latents_from_the_stored_mean_and_std(tmp_path):
    """Each step draws z = mean + std * eps from the posterior (Kingma & Welling 2014, eq. 10), a new eps per step."""
    mean, std = torch.randn(4, 2, 4, 4), torch.full((4, 2, 4, 4), 0.5)
    write_store(tmp_path, mean, std)
    tensors = TrainingRows.from_store(LatentStore(tmp_path), {}, None)
    spec = BatchSpec(seed=3, objective=EDMObjective(EDMConfig()), conditioning=ConditioningSpec(), label_dropout=0.0,
                     caption_dropout=0.0)
    full = PatchStage(4, 4, 1.0, 64)

    def draw(step):
        return draw_batch(tensors, spec, full, 64, step, 0, 0, 1, torch.device("cpu"))

    assert torch.equal(draw(5).x0, draw(5).x0)  # one (seed, step): one draw
    assert not torch.equal(draw(5).x0, draw(6).x0)  # another step: fresh latents
    rows = [torch.randint(0, 4, (64,), generator=make_generator("cpu", 3, step, 0, "indices")) for step in range(60)]
    x0 = torch.cat([draw(step).x0 for step in range(60)])
    of_row_1 = x0[torch.cat(rows) == 1]
    assert len(of_row_1) > 600
    torch.testing.assert_close(of_row_1.mean(0), mean[1], atol=0.08, rtol=0)
    torch.testing.assert_close(of_row_1.std(0), std[1], atol=0.06, rtol=0)


def test_writer_refuses_batches_whose_tensor_names_change(tmp_path):
    writer = StoreWriter(tmp_path, new_manifest(), 10, background=False)
    writer.add({"mean": torch.zeros(1, 2, 4, 4), "std": torch.ones(1, 2, 4, 4)}, items(1))
    with pytest.raises(ValueError, match="tensor names changed"):
        writer.add({"mean": torch.zeros(1, 2, 4, 4)}, items(1))


def test_ranks_read_only_their_own_rows_from_the_memory_mapped_shards(tmp_path):
    """Each of 2 ranks gathers exactly its half of the micro-batch's rows; together they are 1 process's batch."""
    mean, std = torch.randn(12, 2, 4, 4), torch.rand(12, 2, 4, 4)
    write_store(tmp_path, mean, std, shard_size=5)  # two shards of 6 rows (a shard closes after its batch)
    rows = LatentStore(tmp_path).rows()
    assert isinstance(rows["mean"], ShardedRows) and len(rows["mean"].shards) == 2
    assert torch.equal(rows["mean"].materialize(), mean) and torch.equal(rows["std"][torch.tensor([7, 1])], std[[7, 1]])

    class Recorder:
        def __init__(self, inner):
            self.inner, self.shape, self.device, self.read = inner, inner.shape, torch.device("cpu"), []

        def __getitem__(self, index):
            self.read += index.tolist()
            return self.inner[index]

    spec = BatchSpec(seed=0, objective=EDMObjective(EDMConfig()), conditioning=ConditioningSpec(), label_dropout=0.0,
                     caption_dropout=0.0)
    stage, cpu = PatchStage(2, 2, 1.0, 8), torch.device("cpu")
    training = TrainingRows.from_store(LatentStore(tmp_path), {}, None)
    whole = draw_batch(training, spec, stage, 8, step=3, micro=0, rank=0, world=1, device=cpu)
    parts, read = [], []
    for rank in range(2):
        bucket = training.buckets[0]
        recorded = {k: Recorder(v) for k, v in bucket.latents.items()}
        parts.append(draw_batch(replace(training, buckets=[replace(bucket, latents=recorded)]), spec, stage, 8,
                                step=3, micro=0, rank=rank, world=2, device=cpu))
        read.append(recorded["mean"].read)
        assert recorded["std"].read == recorded["mean"].read and len(read[-1]) == 4
    indices = torch.randint(0, 12, (8,), generator=make_generator("cpu", 0, 3, 0, "indices")).tolist()
    assert read == [indices[:4], indices[4:]]
    for name in ("x0", "coords", "sigma", "noise"):
        assert torch.equal(torch.cat([getattr(p, name) for p in parts]), getattr(whole, name))
