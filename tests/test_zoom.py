"""Zoomed-out views (issue 21): whole images at half the side from a second store of the same images, a share of
the full-size steps; off (zoom_p 0) nothing changes, on they are exact, resumable and the same on 2 processes."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import make_image_folder, train_two_processes
from trainer_helpers import assert_same_weights, make_store, photo_crops, tiny_overrides
from typer.testing import CliRunner

from latentpatch.autoencoders import PixelAutoencoder
from latentpatch.checkpoints import latest_checkpoint
from latentpatch.cli.app import app
from latentpatch.config import load_config
from latentpatch.data.store import LatentStore
from latentpatch.errors import UserError
from latentpatch.patches import PatchConfig, PatchSchedule, full_coordinates
from latentpatch.seeding import make_generator
from latentpatch.training.batches import BatchSpec, conditioning_rows, draw_batch
from latentpatch.training.logging import read_log
from latentpatch.training.resolve import with_store
from latentpatch.training.rows import TrainingRows
from latentpatch.training.trainer import train
from latentpatch.training.zoom import ZoomData

CPU = torch.device("cpu")
N = 24  # images: 16x16 latents, zoomed-out 8x8


@pytest.fixture(scope="module")
def photos():
    return photo_crops(N, 16, seed=1)


def half(images: torch.Tensor) -> torch.Tensor:
    return F.interpolate(images, scale_factor=0.5, mode="bilinear", antialias=True, align_corners=False)


@pytest.fixture(scope="module")
def stores(photos, tmp_path_factory):
    """A labelled training store and its zoom store, the zoom store listing the images in reverse order."""
    root = tmp_path_factory.mktemp("stores")
    labels = [i % 3 for i in range(N)]
    train_store = make_store(root / "train", photos, labels=labels)
    zoom_store = make_store(root / "half", half(photos), order=list(reversed(range(N))))
    return train_store, zoom_store


def zoom_cfg(zoom_store, **extra):
    return load_config("tiny", tiny_overrides(**{"patches.zoom_p": 0.25, "patches.zoom_latents": zoom_store,
                                                 **extra}))


def zoom_steps(cfg, steps: range) -> list[int]:
    """The steps of `steps` whose stage is a zoomed-out view (so a test knows it trains some)."""
    s = PatchSchedule(cfg.patches, 16, 16, cfg.train.batch_size, 2, cfg.train.seed, zoom_shape=(8, 8))
    return [i for i in steps if s.draw(i).zoom]


def schedule(zoom_shape=(8, 8), multiple_of=2, batch=8, seed=0, **patches):
    cfg = PatchConfig(**patches)
    cfg.check()
    return PatchSchedule(cfg, 16, 16, batch, multiple_of, seed, zoom_shape=zoom_shape)


def test_zoom_off_or_absent_leaves_the_schedule_its_draws_and_the_trained_weights_unchanged(stores, tmp_path):
    plain = PatchSchedule(PatchConfig(), 16, 16, 8, 2, 0)
    off = schedule(zoom_shape=None, zoom_p=0.0, zoom_latents=None)
    assert [(s.height, s.prob, s.batch_size, s.zoom) for s in off.stages] == [(8, 0.5, 16, False), (16, 0.5, 8, False)]
    assert off.stages == plain.stages
    assert [off.draw(i) for i in range(300)] == [plain.draw(i) for i in range(300)]

    train_store, _ = stores
    steps = {"train.max_steps": 4, "train.ckpt_every": 100}
    a = train(load_config("tiny", tiny_overrides(**steps)), train_store, tmp_path / "a", progress=False, device="cpu")
    b = train(load_config("tiny", tiny_overrides(**steps, **{"patches.zoom_p": 0.0})), train_store, tmp_path / "b",
              progress=False, device="cpu")
    assert_same_weights(a.checkpoint, b.checkpoint)


def test_zoom_stage_takes_its_share_from_full_size_and_its_batch_grows_like_a_crops():
    s = schedule(real_p=0.5, sizes=[0.5], zoom_p=0.2, zoom_latents="z")
    # sorted by area: the 8x8 crop, the 8x8 zoomed-out view (same area, after the crop), full size
    assert [(st.height, st.width, st.prob, st.batch_size, st.zoom) for st in s.stages] == [
        (8, 8, 0.5, 16, False), (8, 8, 0.2, 16, True), (16, 16, pytest.approx(0.3), 8, False)]
    counts = [0, 0, 0]
    for step in range(4000):
        counts[s.stages.index(s.draw(step))] += 1
    assert counts == [1966, 846, 1188]  # seed 0; expected 2000, 800, 1200

    quarter = schedule(zoom_shape=(4, 4), real_p=0.5, sizes=[0.5], zoom_p=0.25, zoom_latents="z", batch_growth=1.5)
    assert [(st.height, st.batch_size, st.zoom) for st in quarter.stages] == [(4, 18, True), (8, 12, False),
                                                                              (16, 8, False)]  # 8 * 1.5**2 = 18
    only = schedule(real_p=1.0, zoom_p=1.0, zoom_latents="z")
    assert [(st.height, st.prob, st.zoom) for st in only.stages] == [(8, 1.0, True)]


def test_zoom_side_not_divisible_by_the_network_patch_size_is_refused():
    with pytest.raises(UserError, match=r"^the zoomed-out latent 6x6 \(patches.zoom_latents z\) is not divisible by "
                                        r"the network's patch size 4; encode"):
        schedule(zoom_shape=(6, 6), multiple_of=4, zoom_p=0.25, zoom_latents="z")


def test_a_zoomed_out_batch_is_the_same_rows_whole_zoom_latents_scaled_on_the_coarse_grid(stores, photos):
    train_store, zoom_store = stores
    cfg = zoom_cfg(zoom_store, **{"model.num_classes": 3, "train.label_dropout": 0})
    cfg, spec, text = with_store(cfg, LatentStore(train_store))
    zoom = ZoomData.open(zoom_store, LatentStore(train_store))
    rows = TrainingRows.from_store(LatentStore(train_store), conditioning_rows(LatentStore(train_store), spec, text),
                                   None, zoom)
    batch_spec = BatchSpec.from_config(cfg, spec, 2)
    stage = next(s for s in PatchSchedule(cfg.patches, 16, 16, 8, 2, zoom_shape=zoom.shape).stages if s.zoom)
    b = draw_batch(rows, batch_spec, stage, 16, step=5, micro=0, rank=0, world=1, device=CPU)

    indices = torch.randint(0, N, (16,), generator=make_generator("cpu", cfg.train.seed, 5, 0, "indices"))
    assert zoom.scale == LatentStore(train_store).latent_std() / LatentStore(zoom_store).latent_std() != 1.0
    assert torch.equal(b.x0, half(photos)[indices] * zoom.scale)
    assert torch.equal(b.coords, full_coordinates(16, 8, 8))
    assert torch.equal(b.cond.class_labels, indices % 3)
    assert b.noise.shape == (16, 3, 8, 8)
    # scaled, the zoomed-out latents have the training latents' std (the preconditioning's sigma_data)
    assert (half(photos) * zoom.scale).std(correction=0).item() == pytest.approx(photos.std(correction=0).item(),
                                                                                  rel=1e-5)
    halves = [draw_batch(rows, batch_spec, stage, 16, step=5, micro=0, rank=r, world=2, device=CPU) for r in (0, 1)]
    assert torch.equal(torch.cat([h.x0 for h in halves]), b.x0)


def test_a_zoomed_out_batch_draws_a_fresh_posterior_sample_of_the_zoom_store(photos, tmp_path):
    small = half(photos)
    train_store = make_store(tmp_path / "train", photos, std=torch.full_like(photos, 0.1))
    zoom_store = make_store(tmp_path / "half", small, std=torch.full_like(small, 0.05))
    cfg, spec, text = with_store(zoom_cfg(zoom_store), LatentStore(train_store))
    zoom = ZoomData.open(zoom_store, LatentStore(train_store))
    assert sorted(zoom.rows) == ["zoom_mean", "zoom_std"]
    rows = TrainingRows.from_store(LatentStore(train_store), {}, None, zoom)
    stage = next(s for s in PatchSchedule(cfg.patches, 16, 16, 8, 2, zoom_shape=zoom.shape).stages if s.zoom)
    b = draw_batch(rows, BatchSpec.from_config(cfg, spec, 2), stage, 4, 0, 0, 0, 1, CPU)

    indices = torch.randint(0, N, (4,), generator=make_generator("cpu", cfg.train.seed, 0, 0, "indices"))
    eps = torch.randn((4, 3, 8, 8), generator=make_generator(CPU, cfg.train.seed, 0, 0, "batch"))
    assert torch.equal(b.x0, (small[indices] + 0.05 * eps) * zoom.scale)


def test_rows_align_by_image_and_held_out_rows_leave_the_zoom_rows_too(stores, photos):
    train_store, zoom_store = stores  # the zoom store lists the images in reverse order
    zoom = ZoomData.open(zoom_store, LatentStore(train_store))
    assert torch.equal(zoom.rows["zoom_mean"].materialize(), half(photos))
    held = torch.tensor([1, 4, 7])
    kept = TrainingRows.from_store(LatentStore(train_store), {}, held, zoom)
    keep = [i for i in range(N) if i not in held.tolist()]
    assert torch.equal(kept.buckets[0].latents["mean"].materialize(), photos[keep])
    assert torch.equal(kept.zoom.latents["mean"].materialize(), half(photos)[keep])


def test_encoded_stores_align_by_sha256_and_flip(tmp_path):
    src = tmp_path / "images"
    make_image_folder(src, n=3, size=32, formats=("png",))
    for side, out in ((16, "full"), (8, "half")):
        args = [src, "--vae", "pixel", "--resolution", side, "--out", tmp_path / out, "--flip", "--workers", 0,
                "--no-progress"]
        assert CliRunner().invoke(app, ["encode", *map(str, args)]).exit_code == 0
    full, small = LatentStore(tmp_path / "full"), LatentStore(tmp_path / "half")
    assert len(full) == len(small) == 6 and sum(item.flip for item in full.items) == 3
    zoom = ZoomData.open(small.path, full)
    got = zoom.rows["zoom_mean"].materialize()
    for i, item in enumerate(full.items):  # each row is its own image's own view: nearest of all by distance
        want = F.avg_pool2d(full.load([i])["mean"].float(), 2)
        nearest = min(range(len(small)), key=lambda j: float((small.load([j])["mean"].float() - want).abs().mean()))
        match = small.items[nearest]
        assert (match.sha256, match.flip) == (item.sha256, item.flip)
        assert torch.equal(got[i], small.load([nearest])["mean"][0])


def test_a_training_image_missing_from_the_zoom_store_is_named(stores, photos, tmp_path):
    train_store, _ = stores
    partial = make_store(tmp_path / "partial", half(photos[:N - 1]))
    with pytest.raises(UserError, match=rf"^patches.zoom_latents {partial} has no latent of img0023.png of the "
                                        r"training store .*; make it with `latentpatch encode SRC --resolution N "
                                        r"--out PATH` .* same --vae and --flip"):
        ZoomData.open(partial, LatentStore(train_store))


def test_a_zoom_store_of_another_autoencoder_is_refused(stores, photos, tmp_path):
    train_store, _ = stores
    other = {**PixelAutoencoder().info.to_dict(), "scaling_factor": 0.5}
    odd = make_store(tmp_path / "odd", half(photos), autoencoder=other)
    with pytest.raises(UserError, match=r"^the training store .* holds latents of the pixel autoencoder .*; encode "
                                        rf"patches.zoom_latents {odd} with the same --vae$"):
        ZoomData.open(odd, LatentStore(train_store))


@pytest.mark.parametrize("extra, message", [
    ({"patches.zoom_p": 0.75, "patches.zoom_latents": "ZOOM"}, r"^patches.zoom_p is a share of the full-size steps"),
    ({"patches.zoom_p": 0.25}, r"^patches.zoom_p=0.25 and patches.zoom_latents=None go together"),
    ({"patches.zoom_latents": "ZOOM"}, r"^patches.zoom_p=0.0 and patches.zoom_latents='.*' go together"),
    ({"patches.zoom_p": 0.25, "patches.zoom_latents": "LARGER"},
     r"^patches.zoom_latents .* holds latents \[3, 32, 32\], not smaller than the training store's \[3, 16, 16\]"),
], ids=["above-real-p", "no-store", "no-share", "larger-latent"])
def test_bad_zoom_config_is_refused_in_one_line_before_anything_is_written(stores, photos, tmp_path, extra,
                                                                          message):
    train_store, zoom_store = stores
    larger = tmp_path / "larger"
    if extra.get("patches.zoom_latents") == "LARGER":
        make_store(larger, F.interpolate(photos[:2], scale_factor=2.0))
    paths = {"ZOOM": str(zoom_store), "LARGER": str(larger)}
    extra = {k: paths.get(v, v) for k, v in extra.items()}
    with pytest.raises(UserError, match=message) as err:
        train(load_config("tiny", tiny_overrides(**extra)), train_store, tmp_path / "run", device="cpu")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "run.json").exists()


def test_zoom_on_an_aspect_bucketed_store_is_refused_in_one_line(stores, tmp_path):
    from latentpatch.encoding.encode import encode

    src = tmp_path / "images"
    make_image_folder(src, n=4, size=[(32, 32), (48, 32)], formats=("png",))
    bucketed = tmp_path / "bucketed"
    encode(src, bucketed, "pixel", 16, buckets=True, workers=0, progress=False)
    assert LatentStore(bucketed).buckets is not None
    _, zoom_store = stores
    with pytest.raises(UserError, match=rf"^patches.zoom_p needs a single-shape training store; {bucketed} holds "
                                        "aspect buckets$"):
        train(zoom_cfg(zoom_store), bucketed, tmp_path / "run", device="cpu")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_zoomed_out_step_counts_its_share_of_a_full_size_image(stores, tmp_path):
    train_store, zoom_store = stores
    cfg = zoom_cfg(zoom_store, **{"patches.real_p": 1.0, "patches.zoom_p": 1.0, "train.max_steps": 2})
    result = train(cfg, train_store, tmp_path / "run", progress=False, device="cpu")
    assert result.kimg == 2 * 16 * (8 * 8) / (16 * 16) / 1000  # batch 8 grown to 16 at half the side


def test_a_stopped_and_resumed_zoom_run_equals_an_uninterrupted_one(stores, tmp_path):
    train_store, zoom_store = stores
    cfg = {"train.max_steps": 10, "train.ckpt_every": 4, "patches.zoom_p": 0.4}
    assert zoom_steps(zoom_cfg(zoom_store, **cfg), range(5, 10)) == [7, 8, 9]
    whole = train(zoom_cfg(zoom_store, **cfg), train_store, tmp_path / "whole", progress=False, device="cpu")
    train(zoom_cfg(zoom_store, **cfg), train_store, tmp_path / "split", max_steps=5, progress=False, device="cpu")
    resumed = train(zoom_cfg(zoom_store, **cfg), train_store, tmp_path / "split", resume=True, progress=False,
                    device="cpu")
    assert resumed.step == whole.step == 10
    assert_same_weights(whole.checkpoint, resumed.checkpoint)


def test_two_gloo_processes_train_zoomed_out_steps_as_one_process(stores, tmp_path):
    train_store, zoom_store = stores
    steps = {"train.max_steps": 4, "train.ckpt_every": 100, "train.log_every": 2, "patches.zoom_p": 0.5,
             "patches.zoom_latents": zoom_store}
    assert zoom_steps(load_config("tiny", tiny_overrides(**steps)), range(4)) == [1, 2]
    one = train(load_config("tiny", tiny_overrides(**steps)), train_store, tmp_path / "one", progress=False,
                device="cpu")
    proc = train_two_processes(train_store, tmp_path / "two", tiny_overrides(**steps))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(one.checkpoint, tmp_path / "two" / "checkpoints" / "step-00000004", atol=1e-6)


def test_the_log_marks_the_zoomed_out_steps(stores, tmp_path):
    train_store, zoom_store = stores
    cfg = zoom_cfg(zoom_store, **{"train.max_steps": 10, "train.log_every": 1, "train.ckpt_every": 100,
                                  "patches.zoom_p": 0.4})
    zoomed = zoom_steps(cfg, range(10))
    assert zoomed and len(zoomed) < 10
    train(cfg, train_store, tmp_path / "run", progress=False, device="cpu")
    records = [r for r in read_log(tmp_path / "run" / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 11))  # the record of step s is the stage drawn at s - 1
    assert [r["step"] - 1 for r in records if r.get("zoom")] == zoomed
    assert {(r["patch"], r["batch"]) for r in records if r.get("zoom")} == {(8, 16)}


def test_a_resume_on_a_zoom_store_rewritten_in_place_is_refused_and_the_run_is_kept(stores, photos, tmp_path):
    train_store, _ = stores
    zoom = make_store(tmp_path / "half", half(photos))
    cfg = zoom_cfg(zoom, **{"train.max_steps": 4, "train.ckpt_every": 2})
    train(cfg, train_store, tmp_path / "run", max_steps=2, progress=False, device="cpu")
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["zoom_store"]
    assert recorded == {"latents": str(zoom.resolve()), "identity": LatentStore(zoom).manifest.identity, "images": N}
    shutil.rmtree(zoom)
    make_store(zoom, half(torch.cat([photos, photos[:1].flip(-1)])))  # every training image still there, one more
    with pytest.raises(UserError, match=rf"^--resume: patches.zoom_latents {zoom} holds other images \({N + 1}\) "
                                        rf"than when run {tmp_path / 'run'} started on it \({N}\); "):
        train(None, train_store, tmp_path / "run", resume=True, progress=False, device="cpu")
    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"
    assert json.loads((tmp_path / "run" / "run.json").read_text())["zoom_store"] == recorded
