"""The encode pipeline as a library call: round trips, manifest, resume, incremental runs and bad input."""

import json
import os

import numpy as np
import pytest
import torch
from filelock import FileLock
from helpers import make_image_folder, make_tiny_kl_vae, photo, save_image, verify_store
from PIL import Image

from latentpatch.autoencoders import load_autoencoder, load_autoencoder_from_info
from latentpatch.data.images import decode_file
from latentpatch.data.store import LatentStore
from latentpatch.data.transforms import resize_center_crop
from latentpatch.encoding.encode import encode
from latentpatch.errors import UserError
from latentpatch.io import sha256_file

FAST = dict(workers=0, batch_size=4, shard_size=4)


@pytest.fixture(scope="module")
def kl_vae(tmp_path_factory):
    return make_tiny_kl_vae(tmp_path_factory.mktemp("vae") / "tiny-kl")


@pytest.fixture
def folder(tmp_path):
    """Six images: every format, three modes, three sizes (all at least 32 px)."""
    src = tmp_path / "images"
    make_image_folder(src, n=6, size=[(48, 32), (32, 40), 36], modes=("RGB", "L", "RGB", "P", "RGB", "RGBA"),
                      formats=("png", "jpg", "webp", "png", "bmp", "tiff"))
    return src


def resized(src, files, size=32):
    return resize_center_crop([decode_file(src / f).image for f in files], (size, size))


def test_pixel_store_decodes_back_to_the_resized_images(folder, tmp_path):
    summary = encode(folder, tmp_path / "store", "pixel", 32, **FAST)
    store = LatentStore(tmp_path / "store")
    assert summary.encoded == summary.total == len(store) == 6 and not summary.skipped
    assert summary.converted == {"L": 1, "P": 1, "RGBA": 1}
    assert len(store.manifest.shards) == 2 and store.load()["mean"].dtype == torch.float16
    decoded = load_autoencoder_from_info(store.info).decode(store.load()["mean"])
    expected = resized(folder, [i.file for i in store.items])
    torch.testing.assert_close(decoded, expected, atol=2**-11, rtol=0)  # fp16 rounding of values in [-1, 1]


def test_manifest_records_autoencoder_hashes_and_captions(folder, tmp_path):
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "img_000.png", "text": "from jsonl"}) + "\n")
    (folder / "img_001.txt").write_text("from a sidecar\n")
    make_image_folder(folder / "sub", n=1, size=32, formats=("png",))
    (folder / "sub" / "metadata.csv").write_text("file_name,text\nimg_000.png,from csv\n")
    encode(folder, tmp_path / "store", "pixel", 32, dtype="float32", **FAST)
    m = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert m["autoencoder"] == load_autoencoder("pixel").info.to_dict()
    assert (m["resolution"], m["latent_shape"], m["dtype"], m["stores_std"], m["count"]) == ([32, 32], [3, 32, 32], "float32", False, 7)
    assert m["text_encoder"] is None and m["store"] == "mean-std" and m["flip"] is False
    by_file = {i["file"]: i for i in m["items"]}
    assert sorted(by_file) == [f"img_00{k}.{e}" for k, e in enumerate(("png", "jpg", "webp", "png", "bmp", "tiff"))] + ["sub/img_000.png"]
    assert all(i["sha256"] == sha256_file(folder / f) for f, i in by_file.items())
    assert by_file["img_000.png"]["caption"] == "from jsonl" and by_file["img_001.jpg"]["caption"] == "from a sidecar"
    assert by_file["sub/img_000.png"]["caption"] == "from csv" and by_file["img_002.webp"]["caption"] is None
    for s in m["shards"]:
        assert sha256_file(tmp_path / "store" / "shards" / s["file"]) == s["sha256"]
    report = json.loads((tmp_path / "store" / "encode_report.json").read_text())
    assert report["encoded"] == 7 and report["skipped_files"] == []


def test_flip_stores_the_mirror_as_a_second_item(folder, tmp_path):
    encode(folder, tmp_path / "store", "pixel", 32, flip=True, **FAST)
    store = LatentStore(tmp_path / "store")
    mean = store.load()["mean"]
    assert len(store) == 12 and [i.flip for i in store.items[:4]] == [False, True, False, True]
    assert store.items[0].file == store.items[1].file
    assert torch.equal(mean[1::2], mean[0::2].flip(-1))


def test_kl_store_holds_the_posterior_mean_and_std(folder, tmp_path, kl_vae):
    summary = encode(folder, tmp_path / "store", kl_vae, 32, **FAST)
    store = LatentStore(tmp_path / "store")
    assert summary.encoded == 6 and store.stores_std and store.latent_shape == (4, 16, 16)
    assert store.info.source == str(kl_vae.resolve()) and store.info.revision == sha256_file(kl_vae / "diffusion_pytorch_model.safetensors")
    loaded = store.load()
    mean, std = load_autoencoder(kl_vae).encode_moments(resized(folder, [i.file for i in store.items]))
    torch.testing.assert_close(loaded["mean"].float(), mean, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(loaded["std"].float(), std, atol=2e-3, rtol=2e-3)


def test_the_manifest_records_the_std_of_the_latents_training_draws(folder, tmp_path, kl_vae):
    """sqrt(Var(mean) + E[std^2]) for a posterior store: the std of z = mean + std * eps, what training sees."""
    encode(folder, tmp_path / "kl", kl_vae, 32, **FAST)
    store = LatentStore(tmp_path / "kl")
    t = store.load()
    mean, std = t["mean"].double(), t["std"].double()
    expected = (mean.var(unbiased=False) + std.square().mean()).sqrt().item()
    assert store.manifest.latent_std == pytest.approx(expected, rel=1e-4)
    assert json.loads((tmp_path / "kl" / "manifest.json").read_text())["latent_std"] == store.manifest.latent_std
    encode(folder, tmp_path / "px", "pixel", 32, **FAST)
    pixels = LatentStore(tmp_path / "px")
    assert pixels.manifest.latent_std == pytest.approx(pixels.load()["mean"].double().std(unbiased=False).item(),
                                                       rel=1e-4)
    for item in pixels.manifest.items:  # a store written before moments were recorded: computed from its rows
        item.moments = None
    assert pixels.manifest.latent_std is None
    assert pixels.latent_std() == pytest.approx(pixels.load()["mean"].double().std(unbiased=False).item(), rel=1e-5)


def test_sample_store_holds_one_draw_that_does_not_depend_on_batching(folder, tmp_path, kl_vae):
    encode(folder, tmp_path / "a", kl_vae, 32, store="sample", seed=5, workers=0, batch_size=1)
    encode(folder, tmp_path / "b", kl_vae, 32, store="sample", seed=5, workers=0, batch_size=6)
    a, b = LatentStore(tmp_path / "a"), LatentStore(tmp_path / "b")
    assert not a.stores_std and set(a.load()) == {"mean"}
    torch.testing.assert_close(a.load()["mean"], b.load()["mean"], atol=1e-3, rtol=1e-3)
    mean_store = encode(folder, tmp_path / "c", kl_vae, 32, **FAST)
    assert mean_store.encoded == 6
    assert not torch.allclose(a.load()["mean"], LatentStore(tmp_path / "c").load()["mean"])


def test_rerun_adding_changing_and_recaptioning(folder, tmp_path):
    out = tmp_path / "store"
    encode(folder, out, "pixel", 32, **FAST)
    again = encode(folder, out, "pixel", 32, **FAST)
    assert again.up_to_date and again.encoded == 0 and again.lines() == [f"store is up to date: 6 images in {out}"]
    make_image_folder(folder, n=2, size=32, start=6, formats=("png",))  # new files
    save_image(photo(9, 40), folder / "img_001.jpg")  # same name, new bytes
    (folder / "img_002.txt").write_text("a new caption")
    third = encode(folder, out, "pixel", 32, **FAST)
    assert (third.encoded, third.already_present, third.changed, third.captions_updated) == (3, 5, ["img_001.jpg"], 1)
    assert any("re-encoded 1 changed files" in line for line in third.lines())
    store = LatentStore(out)
    files = [i.file for i in store.items]
    assert len(store) == 8 and sorted(files) == sorted(set(files))  # every image exactly once
    row = files.index("img_001.jpg")
    assert store.items[row].sha256 == sha256_file(folder / "img_001.jpg")
    torch.testing.assert_close(store.load([row])["mean"].float(), resized(folder, ["img_001.jpg"]), atol=2**-11, rtol=0)
    assert store.captions[files.index("img_002.webp")] == "a new caption"


def test_extra_tensors_hook_adds_per_item_tensors(folder, tmp_path):
    hook = lambda items: {"text_pooled": torch.tensor([[float(len(i.file)), float(i.flip)] for i in items])}  # noqa: E731
    encode(folder, tmp_path / "store", "pixel", 32, flip=True, extra_tensors=hook, **FAST)
    store = LatentStore(tmp_path / "store")
    pooled = store.load()["text_pooled"]
    assert pooled.shape == (12, 2) and pooled[:, 1].tolist() == [0.0, 1.0] * 6
    assert pooled[3].tolist() == [11.0, 1.0]


def test_interrupt_keeps_encoded_batches_and_a_rerun_finishes(folder, tmp_path):
    calls = []

    def interrupt_third_batch(items):
        calls.append(len(items))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        encode(folder, tmp_path / "store", "pixel", 32, extra_tensors=interrupt_third_batch, workers=0, batch_size=2, shard_size=100)
    assert len(LatentStore(tmp_path / "store")) == 4  # the two finished batches were flushed
    rest = encode(folder, tmp_path / "store", "pixel", 32, workers=0, batch_size=2)
    assert (rest.encoded, rest.already_present) == (2, 4) and len(LatentStore(tmp_path / "store")) == 6


def test_orphan_and_missing_shards_are_repaired_on_resume(folder, tmp_path):
    out = tmp_path / "store"
    encode(folder, out, "pixel", 32, **FAST)
    (out / "shards" / "shard-00007.safetensors").write_bytes(b"left by a killed run")
    (out / "shards" / ".shard-00008.safetensors.123.tmp").write_bytes(b"half")
    (out / "shards" / "shard-00000.safetensors").unlink()  # lost: its 4 items are encoded again
    (out / ".manifest.json.abc123.tmp").write_text('{"half": ')
    summary = encode(folder, out, "pixel", 32, **FAST)
    # The orphan shard and the lost one; the half-written temporaries went when encode took the store's lock.
    assert summary.orphans_removed == 2 and summary.encoded == 4
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00001.safetensors", "shard-00002.safetensors"]
    assert not list(out.rglob("*.tmp"))
    store = LatentStore(out)
    verify_store(store)
    assert sorted(i.file for i in store.items) == sorted(p.name for p in folder.iterdir())


def test_workers_decode_in_background_processes_with_the_same_result(folder, tmp_path):
    encode(folder, tmp_path / "a", "pixel", 32, workers=2, batch_size=4)
    encode(folder, tmp_path / "b", "pixel", 32, workers=0, batch_size=4)
    assert torch.equal(LatentStore(tmp_path / "a").load()["mean"], LatentStore(tmp_path / "b").load()["mean"])


def test_bad_files_are_skipped_listed_and_remembered(folder, tmp_path):
    good = (folder / "img_001.jpg").read_bytes()
    (folder / "zero.png").write_bytes(b"")
    (folder / "cut.jpg").write_bytes(good[: len(good) // 3])
    (folder / "fake.webp").write_text("plain text")
    (folder / "readme.md").write_text("not an image extension: listed too, never silently ignored")
    save_image(photo(0, (64, 20)), folder / "small.png")
    out = tmp_path / "store"
    summary = encode(folder, out, "pixel", 32, **FAST)
    assert summary.encoded == 6
    assert summary.skipped == {"empty file": 1, "truncated image": 1, "not a decodable image": 2, "smaller than resolution": 1}
    report = json.loads((out / "encode_report.json").read_text())
    reasons = {s["file"]: s["reason"] for s in report["skipped_files"]}
    assert reasons == {"zero.png": "empty file", "cut.jpg": "truncated image", "fake.webp": "not a decodable image",
                       "readme.md": "not a decodable image", "small.png": "smaller than resolution"}
    assert "64x20 px" in next(s["detail"] for s in report["skipped_files"] if s["file"] == "small.png")
    again = encode(folder, out, "pixel", 32, **FAST)  # skipped files are not decoded again
    assert again.up_to_date and again.skipped == summary.skipped
    assert again.lines()[-1].startswith("skipped 5 files") and again.lines()[-1].endswith(str(out / "encode_report.json"))
    upscaled = encode(folder, out, "pixel", 32, upscale_small=True, **FAST)
    assert upscaled.encoded == 1 and len(LatentStore(out)) == 7 and "small.png" in [i.file for i in LatentStore(out).items]


def test_every_file_is_encoded_or_named_in_the_skip_report_a_gif_by_its_first_frame(tmp_path):
    """Captions (NAME.txt beside an image, metadata.jsonl) are the only files an encode may pass over unnamed."""
    src = tmp_path / "images"
    make_image_folder(src, n=2, size=32, formats=("png",))
    frames = [Image.fromarray(np.full((32, 32, 3), value, np.uint8)) for value in (200, 10)]
    frames[0].save(src / "moving.gif", save_all=True, append_images=frames[1:])
    (src / "img_000.txt").write_text("a caption")
    (src / "notes.txt").write_text("a text file that is no caption")
    (src / "metadata.jsonl").write_text('{"file_name": "img_001.png", "text": "another caption"}\n')
    summary = encode(src, tmp_path / "store", "pixel", 32, **FAST)
    store = LatentStore(tmp_path / "store")
    assert sorted(i.file for i in store.items) == ["img_000.png", "img_001.png", "moving.gif"]
    assert [s["file"] for s in summary.skipped_files] == ["notes.txt"]
    gif = store.load([[i.file for i in store.items].index("moving.gif")])["mean"].float()
    torch.testing.assert_close(gif, torch.full_like(gif, 200 / 127.5 - 1), atol=2e-3, rtol=0)  # the first frame
    assert {i.file: i.caption for i in store.items} == {"img_000.png": "a caption", "img_001.png": "another caption",
                                                        "moving.gif": None}


def test_a_store_made_with_other_settings_is_refused_with_both_sides(folder, tmp_path, kl_vae):
    out = tmp_path / "store"
    encode(folder, out, "pixel", 32, **FAST)
    with pytest.raises(UserError) as e:
        encode(folder, out, kl_vae, 16, **FAST)
    msg = str(e.value)
    assert "the store has pixel autoencoder pixel, this run asks for kl autoencoder" in msg
    assert "resolution: the store has [32, 32], this run asks for [16, 16]" in msg and "new --out" in msg
    with pytest.raises(UserError, match="flip: the store has False, this run asks for True"):
        encode(folder, out, "pixel", 32, flip=True, **FAST)


def test_a_second_encode_into_a_locked_store_fails_at_once(folder, tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    with FileLock(out / ".encode.lock"):
        with pytest.raises(UserError, match="another encode is writing to"):
            encode(folder, out, "pixel", 32, **FAST)
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(src="missing"), "does not exist"),
        (dict(src="a_file.png"), "is not a folder"),
        (dict(src="empty"), "no images found"),
        (dict(src="only_text"), "no images found"),
        (dict(resolution=0), "resolution must be a positive size"),
        (dict(resolution=-8), "resolution must be a positive size"),
        (dict(batch_size=0), "--batch-size must be at least 1"),
        (dict(resolution=33, vae="KL"), "resolution 33 is not a multiple of the autoencoder's factor 2"),
        (dict(vae="no_such_vae_folder/x"), "autoencoder .no_such_vae_folder/x."),
        (dict(store="both"), "--store must be one of"),
        (dict(dtype="int8"), "--dtype must be one of"),
    ],
)
def test_bad_arguments_are_user_errors(folder, tmp_path, kl_vae, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "notes.txt").write_text("x")
    save_image(photo(0, 8), tmp_path / "a_file.png")
    args = {"src": folder, "vae": "pixel", "resolution": 32, **args}
    args["src"] = tmp_path / args["src"] if isinstance(args["src"], str) else args["src"]
    args["vae"] = kl_vae if args["vae"] == "KL" else args["vae"]
    with pytest.raises(UserError, match=message):
        encode(args.pop("src"), tmp_path / "store", args.pop("vae"), args.pop("resolution"), **{**FAST, **args})


def test_rehash_finds_a_change_that_kept_size_and_mtime(folder, tmp_path):
    out = tmp_path / "store"
    encode(folder, out, "pixel", 32, **FAST)
    path = folder / "img_004.bmp"  # uncompressed: flipping a pixel byte keeps the size and a valid file
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert encode(folder, out, "pixel", 32, **FAST).up_to_date  # size and mtime say unchanged
    assert encode(folder, out, "pixel", 32, rehash=True, **FAST).up_to_date is False
    store = LatentStore(out)
    assert next(i for i in store.items if i.file == "img_004.bmp").sha256 == sha256_file(path)


def test_labels_from_class_folders_are_stored_and_fixed(tmp_path):
    from latentpatch.data.store import LatentStore
    from latentpatch.errors import UserError

    src = tmp_path / "src"
    make_image_folder(src / "dogs", n=2, size=24, prefix="d")
    make_image_folder(src / "cats", n=3, size=24, prefix="c")
    encode(src, tmp_path / "store", "pixel", 16, labels="folders", workers=0)
    store = LatentStore(tmp_path / "store")
    assert store.manifest.class_names == ["cats", "dogs"]
    assert sorted((item.file.split("/")[0], item.label) for item in store.items) == [
        ("cats", 0), ("cats", 0), ("cats", 0), ("dogs", 1), ("dogs", 1)]
    make_image_folder(src / "birds", n=1, size=24, prefix="b")
    with pytest.raises(UserError, match="differ from the store's"):
        encode(src, tmp_path / "store", "pixel", 16, labels="folders", workers=0)
    make_image_folder(tmp_path / "flat", n=1, size=24)
    with pytest.raises(UserError, match="needs every image in a class subfolder"):
        encode(tmp_path / "flat", tmp_path / "s2", "pixel", 16, labels="folders", workers=0)
