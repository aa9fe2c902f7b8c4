"""`encode --buckets`: images of mixed shapes each in the aspect bucket nearest their own, resized to cover it and
centre-cropped by the small remainder; incremental, resumable, and refused when mixed with a single-size store."""

import json

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from helpers import encode_killed_midway, make_tiny_kl_vae, photo, save_image, stored_count, verify_store
from torchvision.transforms import InterpolationMode
from typer.testing import CliRunner

from latentpatch.autoencoders import load_autoencoder_from_info
from latentpatch.cli.app import app
from latentpatch.data.images import decode_file
from latentpatch.data.store import LatentStore
from latentpatch.encoding.encode import encode
from latentpatch.errors import UserError

FAST = dict(workers=0, batch_size=4, shard_size=4, buckets=True)
# --resolution 16, pixel autoencoder (factor 1), default step 2: [(20, 12), (18, 14), (16, 16), (14, 18), (12, 20)]
# file: (width, height) of the image, its bucket (H, W), the size (H, W) that covers the bucket, its kept share
MIXED = {
    "land.png": ((48, 32), (12, 20), (13, 20), 0.9),  # 3:2 -> 3:5: 32 * 20/48 = 13.3 rows, 1 cropped
    "port.png": ((32, 48), (20, 12), (20, 13), 0.9),
    "square.png": ((36, 36), (16, 16), (16, 16), 1.0),
    "wide.png": ((80, 20), (12, 20), (12, 48), 5 / 12),  # 4:1 -> the widest bucket, 28 columns cropped
    "near.png": ((40, 32), (14, 18), (14, 18), 35 / 36),  # 4:5 -> 7:9: 32 * 18/40 = 14.4 rows, none cropped
}


def mixed_folder(root, names=tuple(MIXED)):
    for k, name in enumerate(names):
        save_image(photo(k, MIXED[name][0]), root / name)
    return root


def expected_pixels(src, name):
    """The image resized (antialiased bicubic) to cover its bucket, the remainder cut evenly from both sides."""
    _, bucket, cover, _ = MIXED[name]
    image = decode_file(src / name).image.float()
    resized = TF.resize(image, list(cover), InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(resized, list(bucket)).clamp(0, 255) / 127.5 - 1


def stored_pixels(store, name):
    i = [item.file for item in store.items].index(name)
    return load_autoencoder_from_info(store.info).decode(store.load([i])["mean"].float())[0]


def bucket_by_file(store):
    return {i.file: store.buckets[i.bucket] for i in store.items}


def test_each_image_is_stored_in_its_nearest_bucket_covering_all_of_it_but_a_centre_remainder(tmp_path):
    src, out = mixed_folder(tmp_path / "images"), tmp_path / "store"
    summary = encode(src, out, "pixel", 16, **FAST)
    store = LatentStore(out)
    assert store.buckets == [(20, 12), (16, 16), (14, 18), (12, 20)]  # the buckets in use, tallest first
    assert store.resolution == (16, 16) and store.latent_shape == (3, 16, 16)
    assert bucket_by_file(store) == {name: v[1] for name, v in MIXED.items()}
    assert {i.file: i.image_size for i in store.items} == {n: [v[0][1], v[0][0]] for n, v in MIXED.items()}
    for shard in store.manifest.shards:  # one bucket per shard
        assert {i.bucket for i in store.items if store.manifest.shards[i.shard] is shard} == {shard.bucket}
    for name in MIXED:
        torch.testing.assert_close(stored_pixels(store, name), expected_pixels(src, name), atol=2**-10, rtol=0)
    assert summary.buckets == [{"size": [20, 12], "items": 1}, {"size": [16, 16], "items": 1},
                               {"size": [14, 18], "items": 1}, {"size": [12, 20], "items": 2}]
    assert summary.kept_share == pytest.approx(sum(v[3] for v in MIXED.values()) / 5, abs=1e-6)
    report = json.loads((out / "encode_report.json").read_text())
    assert report["buckets"] == summary.buckets and report["kept_share"] == summary.kept_share
    verify_store(store)


def test_a_single_size_encode_reports_no_buckets(tmp_path):
    src = mixed_folder(tmp_path / "images", ("square.png",))
    summary = encode(src, tmp_path / "store", "pixel", 16, workers=0)
    assert summary.buckets is None and summary.kept_share is None
    assert not {"buckets", "kept_share"} & set(json.loads((tmp_path / "store" / "encode_report.json").read_text()))


def test_the_latent_std_is_that_of_all_stored_latent_elements(tmp_path):
    src, out = mixed_folder(tmp_path / "images"), tmp_path / "store"
    encode(src, out, "pixel", 16, **{**FAST, "dtype": "float32"})
    store = LatentStore(out)
    every = torch.cat([r["mean"].materialize().flatten() for r in store.bucket_rows()]).double()
    assert store.latent_std() == pytest.approx(float(every.std(unbiased=False)), rel=1e-5)


def test_an_incremental_encode_puts_a_new_image_in_its_bucket_and_keeps_the_rest(tmp_path):
    src, out = mixed_folder(tmp_path / "images", ("land.png", "square.png", "wide.png")), tmp_path / "store"
    encode(src, out, "pixel", 16, **FAST)
    before = {n: stored_pixels(LatentStore(out), n) for n in ("land.png", "square.png", "wide.png")}
    assert LatentStore(out).buckets == [(16, 16), (12, 20)]
    mixed_folder(src, ("land.png", "square.png", "wide.png", "port.png"))  # rewrites the same bytes, adds port
    summary = encode(src, out, "pixel", 16, **FAST)
    assert (summary.encoded, summary.already_present) == (1, 3)
    store = LatentStore(out)
    assert store.buckets == [(20, 12), (16, 16), (12, 20)]  # the new tallest bucket comes first; indices move up
    assert bucket_by_file(store) == {n: MIXED[n][1] for n in ("land.png", "square.png", "wide.png", "port.png")}
    for name, pixels in before.items():
        assert torch.equal(stored_pixels(store, name), pixels)
    torch.testing.assert_close(stored_pixels(store, "port.png"), expected_pixels(src, "port.png"), atol=2**-10, rtol=0)
    verify_store(store)


def test_an_image_that_changes_shape_moves_bucket_and_its_emptied_bucket_is_forgotten(tmp_path):
    src, out = mixed_folder(tmp_path / "images", ("land.png", "square.png")), tmp_path / "store"
    encode(src, out, "pixel", 16, **FAST)
    save_image(photo(3, (32, 48)), src / "square.png")  # now a 2:3 portrait
    summary = encode(src, out, "pixel", 16, **FAST)
    assert summary.changed == ["square.png"] and summary.encoded == 1
    store = LatentStore(out)
    assert store.buckets == [(20, 12), (12, 20)] and bucket_by_file(store) == {"land.png": (12, 20),
                                                                              "square.png": (20, 12)}
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(s.file for s in store.manifest.shards)
    assert [(b["size"], b["items"]) for b in summary.buckets] == [([20, 12], 1), ([12, 20], 1)]
    verify_store(store)


def test_an_interrupted_encode_keeps_its_shards_and_a_rerun_finishes_every_bucket(tmp_path):
    src, out = mixed_folder(tmp_path / "images"), tmp_path / "store"
    calls = []

    def interrupt_third_call(items):
        calls.append(len(items))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return {}

    # batches of 2 files: land + near (2 buckets: 2 calls), then port + square (the third call is cut short)
    with pytest.raises(KeyboardInterrupt):
        encode(src, out, "pixel", 16, extra_tensors=interrupt_third_call, workers=0, batch_size=2, shard_size=100,
               buckets=True)
    assert sorted(i.file for i in LatentStore(out).items) == ["land.png", "near.png"]
    rest = encode(src, out, "pixel", 16, workers=0, batch_size=2, buckets=True)
    assert (rest.encoded, rest.already_present) == (3, 2)
    assert bucket_by_file(LatentStore(out)) == {name: v[1] for name, v in MIXED.items()}


def test_a_killed_bucketed_encode_resumes_and_stores_every_image_once_in_its_bucket(tmp_path):
    src, out = tmp_path / "images", tmp_path / "store"
    shapes = [(48, 32), (32, 48), (36, 36), (40, 32)]
    for k in range(12):
        save_image(photo(k, shapes[k % 4]), src / f"img_{k:03d}.png")
    args = [src, "--vae", "pixel", "--resolution", 16, "--out", out, "--buckets", "--batch-size", 1,
            "--shard-size", 1, "--workers", 0, "--no-progress"]
    encode_killed_midway(args, out)
    done_before = stored_count(out)
    assert 4 <= done_before < 12, "the first run should have been killed mid-run"
    resumed = CliRunner().invoke(app, ["encode", *map(str, args)])
    assert resumed.exit_code == 0, resumed.output
    assert f"already present: {done_before}" in resumed.output.splitlines()
    store = LatentStore(out)
    assert sorted(i.file for i in store.items) == [f"img_{k:03d}.png" for k in range(12)]
    buckets = {(48, 32): (12, 20), (32, 48): (20, 12), (36, 36): (16, 16), (40, 32): (14, 18)}
    assert bucket_by_file(store) == {f"img_{k:03d}.png": buckets[shapes[k % 4]] for k in range(12)}
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(s.file for s in store.manifest.shards)
    verify_store(store)


def test_unreadable_and_too_small_files_are_named_in_the_skip_report(tmp_path):
    src, out = mixed_folder(tmp_path / "images", ("land.png", "square.png")), tmp_path / "store"
    (src / "zero.png").write_bytes(b"")
    (src / "fake.webp").write_text("plain text")
    save_image(photo(0, (20, 10)), src / "small.png")  # 2:1 -> bucket 12x20, and 10 < 12 rows
    summary = encode(src, out, "pixel", 16, **FAST)
    assert summary.encoded == 2
    report = json.loads((out / "encode_report.json").read_text())
    assert {s["file"]: s["reason"] for s in report["skipped_files"]} == {
        "zero.png": "empty file", "fake.webp": "not a decodable image", "small.png": "smaller than resolution"}
    small = next(s for s in report["skipped_files"] if s["file"] == "small.png")
    assert small["detail"] == "20x10 px; its bucket is 20x12 (--upscale-small allows it)"
    again = encode(src, out, "pixel", 16, **FAST)
    assert again.up_to_date and again.skipped == summary.skipped
    upscaled = encode(src, out, "pixel", 16, upscale_small=True, **FAST)
    assert upscaled.encoded == 1 and bucket_by_file(LatentStore(out))["small.png"] == (12, 20)


def test_a_bucketed_and_a_centre_cropped_store_of_one_folder_differ_in_identity(tmp_path):
    src = mixed_folder(tmp_path / "images")
    encode(src, tmp_path / "buckets", "pixel", 16, **FAST)
    encode(src, tmp_path / "square", "pixel", 16, workers=0)
    encode(src, tmp_path / "again", "pixel", 16, **{**FAST, "batch_size": 1, "shard_size": 2})
    ids = {name: LatentStore(tmp_path / name).manifest.identity for name in ("buckets", "square", "again")}
    assert ids["buckets"] != ids["square"] and ids["buckets"] == ids["again"]  # content, not batching or shards


@pytest.fixture(scope="module")
def kl_vae(tmp_path_factory):
    return make_tiny_kl_vae(tmp_path_factory.mktemp("vae") / "tiny-kl")


@pytest.mark.parametrize(
    "vae, resolution, options, message",
    [
        ("KL", 16, dict(bucket_step=3), "--bucket-step 3 is not a multiple of the autoencoder's factor 2; use a "
                                        "multiple of 2, e.g. 4"),
        ("pixel", 17, dict(), "--resolution 17 is not a multiple of --bucket-step 2; use e.g. 16 or 18"),
        ("pixel", 20, dict(bucket_step=8), "--resolution 20 is not a multiple of --bucket-step 8; use e.g. 16 or 24"),
        ("pixel", (16, 20), dict(), "--buckets takes one --resolution R"),
        ("pixel", 16, dict(max_aspect=0.5), "--max-aspect must be a finite number >= 1"),
        ("pixel", 16, dict(bucket_step=0), "--bucket-step must be at least 1"),
        ("pixel", 16, dict(buckets=False, bucket_step=4), "--bucket-step and --max-aspect shape aspect buckets: add "
                                                          "--buckets"),
    ],
)
def test_bad_bucket_options_are_one_line_user_errors_that_write_nothing(tmp_path, kl_vae, vae, resolution, options,
                                                                        message):
    src, out = mixed_folder(tmp_path / "images", ("square.png",)), tmp_path / "store"
    with pytest.raises(UserError) as e:
        encode(src, out, kl_vae if vae == "KL" else vae, resolution, **{**FAST, **options})
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


def snapshot(out):
    return sorted((p.relative_to(out).as_posix(), p.read_bytes()) for p in out.rglob("*") if p.is_file()
                  and not p.name.startswith(".encode.lock"))


@pytest.mark.parametrize("first, second, message", [
    (True, False, "is a store of aspect buckets (encode --buckets); add --buckets to extend it, or encode into a new "
                  "--out"),
    (False, True, "is a single-size store (images centre-cropped to 16x16); it cannot take aspect buckets: drop "
                  "--buckets, or encode into a new --out"),
])
def test_a_store_is_extended_only_with_its_own_kind_of_encode(tmp_path, first, second, message):
    src, out = mixed_folder(tmp_path / "images", ("land.png", "square.png")), tmp_path / "store"
    encode(src, out, "pixel", 16, **{**FAST, "buckets": first})
    mixed_folder(src, ("land.png", "square.png", "port.png"))
    before = snapshot(out)
    with pytest.raises(UserError) as e:
        encode(src, out, "pixel", 16, **{**FAST, "buckets": second})
    assert str(e.value) == f"{out} {message}"
    assert snapshot(out) == before


def test_a_bucketed_store_is_extended_only_with_its_bucket_step_and_aspect(tmp_path):
    src, out = mixed_folder(tmp_path / "images", ("square.png",)), tmp_path / "store"
    encode(src, out, "pixel", 16, **FAST)
    with pytest.raises(UserError, match=r"bucket_step: the store has 2, this run asks for 4"):
        encode(src, out, "pixel", 16, **FAST, bucket_step=4)
    with pytest.raises(UserError, match=r"max_aspect: the store has 2.0, this run asks for 3.0"):
        encode(src, out, "pixel", 16, **FAST, max_aspect=3.0)


def test_the_encode_command_with_buckets_end_to_end(tmp_path):
    src, out = mixed_folder(tmp_path / "images"), tmp_path / "store"
    args = ["encode", str(src), "--vae", "pixel", "--resolution", "16", "--out", str(out), "--buckets", "--workers",
            "0", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    mean = sum(v[3] for v in MIXED.values()) / 5
    assert (f"buckets (WxH px: images): 12x20 1, 16x16 1, 18x14 1, 20x12 2; mean kept share {mean:.3f} "
            "(the rest centre-cropped)") in result.output.splitlines()
    assert bucket_by_file(LatentStore(out)) == {name: v[1] for name, v in MIXED.items()}
    again = CliRunner().invoke(app, args)
    assert again.output.splitlines()[0] == f"store is up to date: 5 images in {out}"
    bad = CliRunner().invoke(app, [*args[:5], "12", *args[6:], "--bucket-step", "8"])
    assert isinstance(bad.exception, UserError)
    assert str(bad.exception) == "--resolution 12 is not a multiple of --bucket-step 8; use e.g. 8 or 16"


def test_a_fine_tune_encodes_an_image_folder_into_buckets_when_asked(tmp_path):
    from tiny_runs import make_tiny_run

    from latentpatch.finetuning.finetune import _prepare_data
    from latentpatch.finetuning.starting_points import run_base

    found = run_base(make_tiny_run(tmp_path / "base", side=16), "ema")  # pixel latents, resolution 16
    src, out = mixed_folder(tmp_path / "images"), tmp_path / "ft"
    bucketing = {"buckets": True, "bucket_step": 4, "max_aspect": 2.0}
    store = _prepare_data(found, src, out, None, None, None, False, bucketing, "cpu", False)
    assert store.path == out / "latents" and store.resolution == (16, 16)
    assert store.manifest.bucket_step == 4 and bucket_by_file(store) == {
        "land.png": (12, 20), "port.png": (20, 12), "square.png": (16, 16), "wide.png": (12, 20), "near.png": (16, 16)}
