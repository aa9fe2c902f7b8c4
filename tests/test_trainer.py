"""The training loop on a real (tiny) data set: the loss falls, resume is exact, bad input is refused."""

import json

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import assert_same_weights, make_store, photo_crops, tiny_overrides, training_rows

from latentpatch.checkpoints import latest_checkpoint, list_checkpoints, read_state
from latentpatch.conditioning import ConditioningSpec, derive_spec
from latentpatch.config import load_config
from latentpatch.data.manifest import Item
from latentpatch.data.store import LatentStore
from latentpatch.denoiser import build_precond
from latentpatch.diffusion.edm import EDMObjective, denoising_loss_at, fixed_noise, heldout_sigma_grid
from latentpatch.errors import UserError
from latentpatch.patches import PatchSchedule, full_coordinates
from latentpatch.runs import load_run
from latentpatch.training.batches import BatchSpec, draw_batch
from latentpatch.training.resolve import with_store
from latentpatch.training.results import TrainingDiverged
from latentpatch.training.trainer import train


@pytest.fixture(scope="module")
def photos():
    return photo_crops(48, 16, seed=0)  # 32 to train on, 16 held out


@pytest.fixture(scope="module")
def store(photos, tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store"), photos[:32])


def tiny(**extra):
    return load_config("tiny", tiny_overrides(**extra))


def heldout_loss(precond, images):
    """EDM-weighted full-size denoising loss on held-out images at a fixed sigma grid and fixed noise."""
    sigmas = heldout_sigma_grid(8)
    x0 = images.repeat_interleave(len(sigmas), 0)
    noise = fixed_noise(x0.shape, seed=123)
    coords = full_coordinates(x0.shape[0], *images.shape[-2:])
    with torch.no_grad():
        return denoising_loss_at(precond, x0, coords, sigmas.repeat(len(images)), noise, sigma_data=0.5).mean().item()


def test_tiny_dit_heldout_loss_falls_on_real_photos(store, photos, tmp_path):
    cfg = tiny(**{"train.max_steps": 150, "train.ckpt_every": 1000})
    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights
    before = heldout_loss(build_precond(with_store(cfg, LatentStore(store))[0], 3, device="cpu").eval(),
                          photos[32:])
    result = train(cfg, store, tmp_path / "run", progress=False, device="cpu")
    after = heldout_loss(load_run(tmp_path / "run").precond, photos[32:])
    assert result.step == 150 and result.checkpoint.name == "step-00000150"
    assert after < 0.7 * before, (before, after)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 151, 5))
    assert {"loss", "lr", "patch", "img_s", "mem_mib", "grad_norm", "kimg"} <= set(records[0])
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_kimg_counts_full_size_equivalent_images(store, tmp_path):
    cfg = tiny(**{"train.max_steps": 12})
    result = train(cfg, store, tmp_path / "run", progress=False, device="cpu")
    schedule = PatchSchedule(cfg.patches, 16, 16, 8, multiple_of=2, seed=cfg.train.seed)
    draws = [schedule.draw(s) for s in range(12)]
    assert {d.height for d in draws} == {8, 16}  # both sizes occur, so the count is really tested
    # An 8x8 patch of a 16x16 latent is a quarter image; its batch of 16 counts as 4 images.
    expected = sum(d.batch_size * d.height * d.width / 256 for d in draws)
    assert read_state(result.checkpoint)["nimg"] == pytest.approx(expected)
    assert result.kimg == pytest.approx(expected / 1000)


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(store, tmp_path):
    cfg = dict(**{"train.max_steps": 16, "train.ckpt_every": 6})
    whole = train(tiny(**cfg), store, tmp_path / "whole", progress=False, device="cpu")
    train(tiny(**cfg), store, tmp_path / "split", max_steps=9, progress=False, device="cpu")
    resumed = train(tiny(**cfg), store, tmp_path / "split", resume=True, progress=False, device="cpu")
    assert resumed.step == whole.step == 16
    assert_same_weights(whole.checkpoint, resumed.checkpoint)


def test_batch_randomness_depends_on_seed_and_step_and_ranks_split_one_global_batch(store):
    cfg = tiny()
    tensors = training_rows(store)
    stage = PatchSchedule(cfg.patches, 16, 16, 8, multiple_of=2).stages[0]
    cfg = BatchSpec.from_config(cfg, ConditioningSpec())
    one = draw_batch(tensors, cfg, stage, 16, step=3, micro=0, rank=0, world=1, device=torch.device("cpu"))
    again = draw_batch(tensors, cfg, stage, 16, step=3, micro=0, rank=0, world=1, device=torch.device("cpu"))
    halves = [draw_batch(tensors, cfg, stage, 16, step=3, micro=0, rank=r, world=2, device=torch.device("cpu"))
              for r in range(2)]
    other = draw_batch(tensors, cfg, stage, 16, step=4, micro=0, rank=0, world=1, device=torch.device("cpu"))
    for field in ("x0", "coords", "sigma", "noise"):
        assert torch.equal(getattr(one, field), getattr(again, field))
        assert torch.equal(getattr(one, field), torch.cat([getattr(h, field) for h in halves]))
    assert not torch.equal(one.noise, other.noise)
    assert one.x0.shape == (16, 3, 8, 8) and one.coords.shape == (16, 2, 8, 8)


def _nan_after(calls: int):
    real, count = EDMObjective.loss, {"n": 0}

    def loss(*args, **kwargs):
        count["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if count["n"] > calls else out

    return loss


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(store, tmp_path, monkeypatch):
    monkeypatch.setattr(EDMObjective, "loss", _nan_after(5))  # step index 5 turns NaN
    cfg = tiny(**{"train.max_steps": 20, "train.ckpt_every": 2, "train.keep_checkpoints": 5})
    with pytest.raises(TrainingDiverged, match=r"step 5: the loss became nan.*step-00000004"):
        train(cfg, store, tmp_path / "run", progress=False, device="cpu")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000002", "step-00000004"]
    weights = load_file(latest_checkpoint(tmp_path / "run") / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_infinite_learning_rate_never_writes_a_nonfinite_checkpoint(store, tmp_path):
    cfg = tiny(**{"optim.lr": ".inf", "optim.warmup_steps": 1, "train.ckpt_every": 1, "train.max_steps": 3})
    with pytest.raises(TrainingDiverged, match="no checkpoint was written"):
        train(cfg, store, tmp_path / "run", progress=False, device="cpu")
    assert list_checkpoints(tmp_path / "run") == []


def test_missing_or_foreign_latent_store_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train(tiny(), tmp_path / "nowhere", tmp_path / "run", device="cpu")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "cat.png").write_bytes(b"\x89PNG")
    with pytest.raises(UserError, match="not a latent store"):
        train(tiny(), tmp_path / "images", tmp_path / "run", device="cpu")


@pytest.mark.parametrize("side, sizes, match", [
    (18, "[0.5]", r"patch size 9x9 .* not divisible by the network's patch size 2"),
    (15, "[0.4]", r"patch size 15x15 \(of latent 15x15\) is not divisible"),  # its 6x6 patches divide by 2
])
def test_latent_size_not_divisible_by_patch_or_dit_patch_is_refused(tmp_path, side, sizes, match):
    path = make_store(tmp_path / "store", torch.randn(2, 3, side, side))
    with pytest.raises(UserError, match=match):
        train(tiny(**{"patches.sizes": sizes}), path, tmp_path / "run", device="cpu")


def test_new_run_into_a_folder_with_checkpoints_is_refused(store, tmp_path):
    train(tiny(**{"train.max_steps": 2}), store, tmp_path / "run", progress=False, device="cpu")
    with pytest.raises(UserError, match="--resume"):
        train(tiny(**{"train.max_steps": 2}), store, tmp_path / "run", device="cpu")


def test_resume_with_a_different_config_names_the_keys(store, tmp_path):
    train(tiny(**{"train.max_steps": 2}), store, tmp_path / "run", progress=False, device="cpu")
    with pytest.raises(UserError, match=r"optim\.lr: 0\.001 -> 0\.002.*train\.batch_size: 8 -> 16"):
        train(tiny(**{"optim.lr": 0.002, "train.batch_size": 16}), store, tmp_path / "run", resume=True,
              device="cpu")
    # max_steps may differ: that is how a finished run is extended.
    result = train(tiny(**{"train.max_steps": 3}), store, tmp_path / "run", resume=True, progress=False,
                   device="cpu")
    assert result.step == 3


def test_batch_not_divisible_by_accumulation_is_refused(store, tmp_path):
    with pytest.raises(UserError, match="train.grad_accum"):
        train(tiny(**{"train.grad_accum": 3}), store, tmp_path / "run", device="cpu")


def test_class_conditional_model_needs_labels_in_the_store(store, tmp_path):
    with pytest.raises(UserError, match="have no 'label'"):
        train(tiny(**{"model.num_classes": 4}), store, tmp_path / "run", device="cpu")


def test_labels_train_and_are_dropped_to_the_null_label(photos, tmp_path):
    path = make_store(tmp_path / "store", photos[:8], labels=[i % 3 for i in range(8)])
    with pytest.raises(UserError, match="label 2, outside 0..1"):
        train(tiny(**{"model.num_classes": 2}), path, tmp_path / "bad", device="cpu")
    cfg = tiny(**{"model.num_classes": 3, "train.label_dropout": 0.5})
    cfg, spec, text = derive_spec(cfg, LatentStore(path))
    tensors = training_rows(path, spec, text)
    stage = PatchSchedule(cfg.patches, 16, 16, 8, multiple_of=2).stages[-1]
    b = draw_batch(tensors, BatchSpec.from_config(cfg, spec), stage, 64, step=0, micro=0, rank=0, world=1,
                   device=torch.device("cpu"))
    assert set(b.cond.class_labels.tolist()) == {0, 1, 2, 3}  # 3 = the null label
    assert train(cfg, path, tmp_path / "run", max_steps=2, progress=False, device="cpu").step == 2


def test_sample_grid_is_written_every_n_steps(store, tmp_path):
    cfg = tiny(**{"train.max_steps": 4, "train.sample_every": 2, "train.sample_n": 4, "train.sample_steps": 3})
    train(cfg, store, tmp_path / "run", progress=False, device="cpu")
    from PIL import Image

    grids = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert grids == ["step-00000002.png", "step-00000004.png"]
    with Image.open(tmp_path / "run" / "samples" / "step-00000004.png") as im:
        width, height = im.size  # 2x2 grid of 16 px images, 2 px padding, under a strip labelled with the step
        strip = height - (2 * 16 + 3 * 2)
        assert width == 2 * 16 + 3 * 2 and 8 <= strip <= 24
        text = im.convert("L").crop((0, 0, width, strip))
        assert min(text.get_flattened_data()) < 64 and max(text.get_flattened_data()) == 255  # dark letters on white


def test_callback_sees_each_step_and_can_stop_the_run(store, tmp_path):
    seen = []

    def callback(info):
        seen.append((info.step, info.patch, info.batch_size))
        return info.step == 3

    result = train(tiny(**{"train.max_steps": 50}), store, tmp_path / "run", progress=False, device="cpu",
                   callback=callback)
    assert [s for s, _, _ in seen] == [1, 2, 3] and result.step == 3
    assert result.checkpoint.name == "step-00000003"  # stopping writes a checkpoint
    assert all(batch == {8: 16, 16: 8}[patch[0]] for _, patch, batch in seen)


def test_stored_posterior_std_draws_a_fresh_latent_per_step(tmp_path):
    from latentpatch.autoencoders import PixelAutoencoder
    from latentpatch.data.manifest import Manifest
    from latentpatch.data.store import StoreWriter

    manifest = Manifest(autoencoder=PixelAutoencoder().info.to_dict(), resolution=[16, 16],
                        latent_shape=[3, 16, 16], dtype="float32", stores_std=True)
    writer = StoreWriter(tmp_path, manifest, shard_size=8, background=False)
    items = [Item(file=f"{i}.png", sha256=f"{i:064x}", caption=None, flip=False, shard=0, row=0) for i in range(4)]
    writer.add({"mean": torch.zeros(4, 3, 16, 16), "std": torch.full((4, 3, 16, 16), 2.0)}, items)
    writer.close()
    tensors = training_rows(tmp_path)
    stage = PatchSchedule(load_config("full-size").patches, 16, 16, 8, multiple_of=2).stages[0]
    spec = BatchSpec.from_config(tiny(), ConditioningSpec())
    draw = [draw_batch(tensors, spec, stage, 64, step=s, micro=0, rank=0, world=1, device=torch.device("cpu"))
            for s in (0, 1)]
    assert draw[0].x0.std().item() == pytest.approx(2.0, rel=0.05)  # mean 0 + std 2 * N(0, 1)
    assert not torch.equal(draw[0].x0, draw[1].x0)


def test_unet_patches_must_divide_by_its_total_downsampling(store, tmp_path):
    from latentpatch.denoiser import size_multiple
    from latentpatch.models import build_network

    cfg = load_config("unet-small", ["model.unet.block_out_channels=[16, 32, 32]"])
    assert size_multiple(build_network(cfg.model, 3, device="cpu")) == 4
    assert size_multiple(build_precond(tiny(**{"edm.sigma_data": 0.5}), 3, device="cpu").net) == 2
    with pytest.raises(UserError, match=r"patch size 6x6 .* network's patch size 4"):
        train(load_config("unet-small", ["patches.sizes=[0.375]", "model.unet.block_out_channels=[16, 32, 32]"]),
              store, tmp_path / "run", device="cpu")


def test_a_run_with_nothing_left_to_train_says_so(store, tmp_path):
    train(tiny(**{"train.max_steps": 2}), store, tmp_path / "run", progress=False, device="cpu")
    with pytest.warns(UserWarning, match="is at step 2 and train.max_steps is 2: nothing to train"):
        again = train(None, store, tmp_path / "run", resume=True, device="cpu")
    assert (again.step, again.trained) == (2, 0)  # a rerun of a finished run is harmless, and says so
    with pytest.raises(UserError, match="train.max_steps must be at least 1, got 0"):
        train(tiny(), store, tmp_path / "new", max_steps=0, device="cpu")


@pytest.mark.parametrize("std", [0.5, 1.0])
def test_the_stores_latent_std_reaches_the_preconditioning(tmp_path, std):
    """edm.sigma_data unset: the run takes the store's measured std, and c_skip, c_out follow it exactly."""
    from latentpatch.diffusion.edm import precond_coefficients

    g = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, 16, 16, generator=g)
    images = (images - images.mean()) / images.std(unbiased=False) * std  # latents of std exactly `std`
    path = make_store(tmp_path / "store", images)
    result = train(tiny(**{"train.max_steps": 1}), path, tmp_path / "run", progress=False, device="cpu")
    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert cfg.edm.sigma_data == pytest.approx(std, abs=1e-4)  # recorded in the run, rounded to 4 decimals
    precond = load_run(result.run_dir).precond
    sigma = torch.tensor([0.3, 1.0, 4.0])
    c_skip, c_out, _, _ = precond_coefficients(sigma, precond.sigma_data)
    torch.testing.assert_close(c_skip, std**2 / (sigma**2 + std**2), rtol=1e-3, atol=0)
    torch.testing.assert_close(c_out, sigma * std / (sigma**2 + std**2).sqrt(), rtol=1e-3, atol=0)
    explicit = train(tiny(**{"train.max_steps": 1, "edm.sigma_data": 0.7}), path, tmp_path / "set", progress=False,
                     device="cpu")
    assert load_run(explicit.run_dir).precond.sigma_data == 0.7  # a value the config sets wins


def test_the_runs_own_training_time_is_logged_and_continues_on_resume(store, tmp_path):
    """train_s: the process's CPU seconds of optimisation steps on the CPU (training.clock), in every log record and
    checkpoint; a resumed run's clock starts from its checkpoint's."""
    cfg = tiny(**{"train.max_steps": 10, "train.ckpt_every": 5, "train.log_every": 5})
    train(cfg, store, tmp_path / "run", max_steps=5, progress=False, device="cpu")
    saved = read_state(latest_checkpoint(tmp_path / "run"))["train_s"]
    train(None, store, tmp_path / "run", resume=True, max_steps=10, progress=False, device="cpu")
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    times = [r["train_s"] for r in records if "loss" in r]
    assert [r["step"] for r in records if "loss" in r] == [5, 10] and times[0] == saved
    assert 0 < times[0] < times[1]
