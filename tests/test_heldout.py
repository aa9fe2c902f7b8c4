"""Held-out evaluation during training: the logged loss is the EMA's, the best checkpoint is kept and sampled."""

import json

import pytest
import torch
from trainer_helpers import make_store, photo_crops, tiny_overrides

from latentpatch.checkpoints import best_checkpoint, latest_checkpoint, list_checkpoints, read_state
from latentpatch.config import load_config
from latentpatch.data.store import LatentStore
from latentpatch.errors import UserError
from latentpatch.sampling.generate import sample
from latentpatch.metrics.denoising import denoising_loss, store_heldout_set
from latentpatch.runs import load_run
from latentpatch.training.heldout import heldout_rows
from latentpatch.training.logging import read_log
from latentpatch.training.trainer import train

FAST = dict(progress=False, device="cpu")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    photos = photo_crops(40, 16, seed=0)
    return make_store(root / "train", photos[:32]), make_store(root / "held", photos[32:])


def heldout_run(train_store, held_store, out, **extra):
    over = {"heldout.latents": str(held_store), "heldout.every": 4, "heldout.sigmas": 4, "train.max_steps": 24,
            "train.ckpt_every": 12, "train.keep_checkpoints": 1, "optim.lr": 0.003, **extra}
    return train(load_config("tiny", tiny_overrides(**over)), train_store, out, **FAST)


def test_the_logged_heldout_loss_is_the_emas_on_the_fixed_grid_and_the_best_is_kept(stores, tmp_path):
    train_store, held_store = stores
    heldout_run(train_store, held_store, tmp_path / "run")
    held = [r for r in read_log(tmp_path / "run" / "log.jsonl") if "heldout_loss" in r]
    assert [r["step"] for r in held] == [0, 4, 8, 12, 16, 20, 24]
    best = min(held[1:], key=lambda r: r["heldout_loss"])
    found = best_checkpoint(tmp_path / "run")
    assert found is not None and found.name == f"step-{best['step']:08d}"
    assert found in list_checkpoints(tmp_path / "run")  # retention (keep 1) keeps it beside the latest
    state = read_state(found)["heldout_best"]
    assert (state["loss"], state["step"]) == (best["heldout_loss"], best["step"])
    # The same number again, computed directly on that checkpoint's EMA with the training store's weighting.
    ema = load_run(tmp_path / "run", weights="ema", checkpoint=best["step"]).precond
    heldout = store_heldout_set(held_store, num_sigmas=4, sigma_data=round(LatentStore(train_store).latent_std(), 4))
    direct = denoising_loss(ema, heldout)
    assert direct.mean == pytest.approx(best["heldout_loss"], rel=1e-5)
    assert direct.per_sigma == pytest.approx(best["heldout_per_sigma"], rel=1e-5)
    # `sample` loads the best checkpoint by default, the latest when asked.
    job = tmp_path / "samples"
    sample(tmp_path / "run", n=1, steps=2, out=job, output="none")
    assert json.loads((job / "job.json").read_text())["settings"]["step"] == best["step"]
    latest = load_run(tmp_path / "run", checkpoint="latest")
    assert latest.step == 24 and latest.checkpoint == latest_checkpoint(tmp_path / "run")
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_run_keeps_its_heldout_history_and_best(stores, tmp_path):
    train_store, held_store = stores
    heldout_run(train_store, held_store, tmp_path / "whole")
    heldout_run(train_store, held_store, tmp_path / "split", **{"train.max_steps": 12})
    train(None, train_store, tmp_path / "split", resume=True, max_steps=24, **FAST)
    logs = [[(r["step"], r["heldout_loss"]) for r in read_log(tmp_path / run / "log.jsonl") if "heldout_loss" in r]
            for run in ("whole", "split")]
    assert logs[0] == logs[1]
    assert best_checkpoint(tmp_path / "whole").name == best_checkpoint(tmp_path / "split").name


def test_a_heldout_share_takes_whole_source_images_out_of_training(tmp_path):
    from latentpatch.training.rows import TrainingRows

    store = LatentStore(make_store(tmp_path / "store", photo_crops(10, 16)))
    for i, item in enumerate(store.items):  # pairs of rows from one source image, like an image and its flip
        item.sha256 = f"{i // 2:064x}"
    rows = heldout_rows(store, 0.4, seed=0)
    assert len(rows) == 4 and len({store.items[int(r)].sha256 for r in rows}) == 2  # 2 of 5 images, both views
    assert torch.equal(rows, heldout_rows(store, 0.4, seed=0)) and not torch.equal(rows, heldout_rows(store, 0.4, 1))
    cond = {"labels": torch.arange(10), "null_text_tokens": torch.zeros(1, 3)}
    left = TrainingRows.from_store(store, cond, rows)
    kept = [i for i in range(10) if i not in rows.tolist()]
    assert torch.equal(left.buckets[0].latents["mean"].materialize(), store.load()["mean"][kept])
    assert left.cond["labels"].tolist() == kept
    assert left.cond["null_text_tokens"].shape == (1, 3)  # the empty caption is not a row
    with pytest.raises(UserError, match="would hold out all 5 source images"):
        heldout_rows(store, 0.99, seed=0)


def test_a_share_split_trains_on_the_rest_and_scores_the_held_rows(stores, tmp_path):
    train_store, _ = stores
    over = {"heldout.share": 0.25, "heldout.every": 5, "train.max_steps": 5, "train.ckpt_every": 5}
    train(load_config("tiny", tiny_overrides(**over)), train_store, tmp_path / "run", **FAST)
    held = [r for r in read_log(tmp_path / "run" / "log.jsonl") if "heldout_loss" in r]
    assert [r["step"] for r in held] == [0, 5]
    with pytest.raises(UserError, match="heldout.every=5 needs held-out latents"):
        load_config("tiny", ["heldout.every=5", "heldout.share=0"])


def test_training_and_eval_score_a_checkpoint_with_one_data_std(stores, tmp_path):
    """The held-out weighting's sd is the training store's measured std, recorded in run.json; `latentpatch
    eval`'s held-out loss reads it there, so it equals the figure training logged for the same checkpoint
    (eval used to weight with the held-out store's own std, training with the training store's)."""
    from latentpatch.metrics.evaluate import evaluate_run

    train_store, held_store = stores
    heldout_run(train_store, held_store, tmp_path / "run", **{"train.max_steps": 8, "train.keep_checkpoints": 3})
    weight_sd = json.loads((tmp_path / "run" / "run.json").read_text())["heldout"]["weight_sd"]
    stds = [round(LatentStore(path).latent_std(), 4) for path in (train_store, held_store)]
    assert weight_sd == stds[0] != stds[1]
    logged = {r["step"]: r["heldout_loss"] for r in read_log(tmp_path / "run" / "log.jsonl") if "heldout_loss" in r}
    for step in (4, 8):
        report = evaluate_run(tmp_path / "run", metrics="loss", latents=held_store, checkpoint=step, loss_sigmas=4,
                              device="cpu")
        assert report["metrics"]["loss"]["weight_sigma_data"] == weight_sd
        assert report["metrics"]["loss"]["mean"] == pytest.approx(logged[step], rel=1e-6)
