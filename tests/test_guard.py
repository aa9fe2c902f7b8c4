"""A small store is guarded by default: a held-out share of its source images (flips with them), a few dozen
evaluations, the best checkpoint kept and early stopping; a large store, or heldout.share=0, trains as told."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from trainer_helpers import make_store, photo_crops, tiny_overrides

from latentpatch.checkpoints import best_checkpoint, latest_checkpoint, list_checkpoints
from latentpatch.config import load_config
from latentpatch.data.store import LatentStore
from latentpatch.distributed import init_distributed
from latentpatch.training import heldout as heldout_module
from latentpatch.training.guard import HeldoutPlan, choose_defaults
from latentpatch.training.heldout import HeldoutEval
from latentpatch.training.logging import read_log
from latentpatch.training.resolve import resolve_run, with_store
from latentpatch.training.trainer import _Session, train

FAST = dict(progress=False, device="cpu")
AUTO = {"heldout.share": "null"}  # what a user gets who says nothing about held-out data


def fake_store(sources: int, views: int = 1):
    """Only what the defaults read: items with a file hash, `views` rows per source (an image and its flip), and
    the manifest's count of source images."""
    items = [SimpleNamespace(sha256=f"{i:064x}", file=f"{i}.png") for i in range(sources) for _ in range(views)]
    return SimpleNamespace(items=items, manifest=SimpleNamespace(image_count=sources))


def auto_config(**extra):
    return load_config("tiny", tiny_overrides(**{**AUTO, **extra}))


@pytest.mark.parametrize("sources, held", [(20, 4), (40, 4), (80, 8), (1000, 100), (5000, 256)])
def test_a_small_store_holds_out_a_tenth_of_its_source_images_and_evaluates_40_times(sources, held):
    cfg, note = choose_defaults(auto_config(**{"train.max_steps": 1000}), fake_store(sources, views=2))
    assert cfg.heldout.share * sources == pytest.approx(held)  # at least 4, at most heldout.limit (256)
    assert (cfg.heldout.every, cfg.train.patience, note) == (25, 10, None)


def test_a_large_store_and_an_explicit_share_0_train_exactly_as_configured():
    for cfg, store in [(auto_config(), fake_store(5001)), (auto_config(**{"heldout.share": 0}), fake_store(40))]:
        chosen, note = choose_defaults(cfg, store)
        assert (chosen.heldout.share, chosen.heldout.every, chosen.train.patience) == (0.0, 0, 0)
        assert note == (None if len(store.items) == 40 else "the store has 5001 source images, more than 5000: it "
                        "trains as configured; set heldout.share or heldout.latents to evaluate")
    # A large store asked for evaluation (heldout.every) gets the held-out share; early stopping stays off.
    chosen, _ = choose_defaults(auto_config(**{"heldout.every": 50}), fake_store(100_000))
    assert (chosen.heldout.share * 100_000, chosen.heldout.every, chosen.train.patience) == (256, 50, 0)
    # A store of 19 images has none to spare, whatever heldout.every asks: it trains on all and says why.
    chosen, note = choose_defaults(auto_config(**{"heldout.every": 50}), fake_store(19, views=2))
    assert (chosen.heldout.share, chosen.heldout.every, chosen.train.patience) == (0.0, 0, 0)
    assert note.startswith("the store has 19 source images, fewer than 20")


def test_the_heldout_images_go_with_their_flips_and_are_never_trained_on(tmp_path):
    photos = photo_crops(24, 8)
    store = LatentStore(make_store(tmp_path / "store", torch.cat([photos, photos.flip(-1)])))
    for i, item in enumerate(store.items):  # rows i and 24 + i: an image and its flip
        item.sha256, item.file, item.flip = f"{i % 24:064x}", f"img{i % 24:04d}.png", i >= 24
    cfg, note = choose_defaults(auto_config(), store)
    plan = HeldoutPlan.of(cfg, store, note)
    assert len(plan.files) == 4 and len(plan.rows) == 8
    assert sorted(int(r) % 24 for r in plan.rows) == sorted(2 * [int(r) for r in plan.rows if r < 24])
    session = _Session.start(resolve_run(cfg, store, tmp_path / "run"), init_distributed("cpu"))
    trained, every_row = session.rows.buckets[0].latents["mean"].materialize(), store.load()["mean"]
    assert len(trained) == 40
    for row in range(48):  # no held-out latent is a training row; every other one is
        assert (trained == every_row[row]).flatten(1).all(1).any() == (row not in plan.rows.tolist())
    assert len(session.heldout.heldout) == 8


def test_a_store_too_small_to_spare_images_says_so_once_and_trains_on_all(tmp_path, capsys):
    store = make_store(tmp_path / "store", photo_crops(12, 8))
    result = train(auto_config(**{"train.max_steps": 6}), store, tmp_path / "run", **FAST)
    said = capsys.readouterr().out
    assert said.count("the store has 12 source images, fewer than 20: too few to hold any out") == 1
    assert result.step == 6 and result.best is None and result.summary() is None
    assert not any("heldout_loss" in r for r in read_log(tmp_path / "run" / "log.jsonl"))
    info = json.loads((tmp_path / "run" / "run.json").read_text())["heldout"]
    assert (info["held_out_images"], info["every"], info["patience"]) == (0, 0, 0) and "fewer than 20" in info["note"]


def test_the_chosen_heldout_plan_is_printed_recorded_and_kept_on_resume(tmp_path, capsys):
    from latentpatch.training.resume import SavedRun, chosen_config

    store = make_store(tmp_path / "store", photo_crops(32, 8))
    cfg = auto_config(**{"train.max_steps": 80, "train.log_every": 20, "train.ckpt_every": 20})
    train(cfg, store, tmp_path / "whole", **FAST)
    train(cfg, store, tmp_path / "split", callback=lambda info: info.step == 40, **FAST)  # stopped at 40
    train(cfg, store, tmp_path / "split", resume=True, **FAST)
    said = capsys.readouterr().out
    assert said.count("held-out: 4 of 32 source images (4 store rows, flips with their image), never trained on; "
                      "evaluated every 10 steps; early stop after 10 evaluations without a new best") == 3
    infos = [json.loads((tmp_path / r / "run.json").read_text())["heldout"] for r in ("whole", "split")]
    assert infos[0] == infos[1] and infos[0]["held_out_images"] == 4 and infos[0]["every"] == 10
    assert infos[0]["weight_sd"] == round(LatentStore(store).latent_std(), 4)
    logs = [[(r["step"], r["heldout_loss"]) for r in read_log(tmp_path / r / "log.jsonl") if "heldout_loss" in r]
            for r in ("whole", "split")]
    assert logs[0] == logs[1] and [s for s, _ in logs[0][:3]] == [0, 10, 20]
    # A resume asking for a longer run keeps the choice made at the start (every 10), not one for 1600 steps (40).
    longer = auto_config(**{"train.max_steps": 1600, "train.log_every": 20, "train.ckpt_every": 20})
    run = tmp_path / "split"
    kept = chosen_config(with_store(longer, LatentStore(store))[0], SavedRun.read(run), run, True, None)
    assert (kept.heldout.every, kept.heldout.share, kept.train.patience) == (10, 4 / 32, 10)


def test_early_stopping_counts_evaluations_without_a_new_best():
    held = HeldoutEval(heldout=None, patience=3)
    losses = {0: 9.0, 2: 1.0, 4: 0.8, 6: 0.85, 8: 0.8, 10: 0.79, 12: 0.9, 14: 0.8, 16: 0.795}
    stops = []
    for step, loss in losses.items():
        held.record(loss, step)
        stops.append(held.should_stop)
    assert (held.best_loss, held.best_step, held.since_best) == (0.79, 10, 3)  # a tie (0.8 at 8) is no new best
    assert stops == [False] * 8 + [True]


SCRIPT = {0: 5.0, 2: 1.0, 4: 0.9, 6: 0.7, 8: 0.75, 10: 0.72, 12: 0.71, 14: 0.8, 16: 0.6, 18: 0.65}


@pytest.fixture
def scripted_loss(monkeypatch):
    """The held-out loss of step s is SCRIPT[s] (0.9 for steps not scripted), whatever the weights are."""
    from latentpatch.metrics.denoising import DenoisingLoss

    def loss(ema, heldout):
        value = SCRIPT.get(scripted_loss.step, 0.9)
        return DenoisingLoss([1.0], [value], value, len(heldout), 0, heldout.sigma_data)

    original = HeldoutEval.evaluate

    def evaluate(self, ema, step):
        scripted_loss.step = step
        return original(self, ema, step)

    monkeypatch.setattr(heldout_module, "denoising_loss", loss)
    monkeypatch.setattr(HeldoutEval, "evaluate", evaluate)


def test_early_stopping_stops_at_the_right_evaluation_with_best_in_place_and_resumes_exactly(tmp_path, scripted_loss):
    store = make_store(tmp_path / "store", photo_crops(32, 8))
    cfg = auto_config(**{"train.max_steps": 100, "heldout.every": 2, "train.patience": 3, "train.ckpt_every": 5})
    whole = train(cfg, store, tmp_path / "whole", **FAST)
    # Best 0.7 at step 6; 8, 10 and 12 bring none: the run ends at step 12, never seeing 16's 0.6.
    assert (whole.step, whole.best_step, whole.best_loss, whole.stopped_early) == (12, 6, 0.7, 3)
    assert best_checkpoint(tmp_path / "whole").name == "step-00000006"
    assert latest_checkpoint(tmp_path / "whole").name == "step-00000012"
    assert whole.summary() == ("stopped early at step 12: no new best held-out loss in 3 evaluations. Best held-out "
                               "loss 0.7000 at step 6 (last: 0.7100 at step 12); `latentpatch sample` uses that "
                               "checkpoint (BEST, step-00000006)")
    # Killed after step 10 (its checkpoint: step 10, two evaluations past the best), then resumed.
    train(cfg, store, tmp_path / "split", max_steps=10, **FAST)
    split = train(None, store, tmp_path / "split", resume=True, max_steps=100, **FAST)
    assert (split.step, split.best_step, split.stopped_early) == (12, 6, 3)
    names = [[p.name for p in list_checkpoints(tmp_path / run)] for run in ("split", "whole")]
    assert names[0] == names[1]
    for name in ("model.safetensors", "ema.safetensors"):
        assert (latest_checkpoint(tmp_path / "split") / name).read_bytes() == \
            (latest_checkpoint(tmp_path / "whole") / name).read_bytes()
    # A run that stopped early is done: resuming it trains nothing and says why.
    with pytest.warns(UserWarning, match="stopped early at step 12"):
        again = train(None, store, tmp_path / "whole", resume=True, max_steps=100, **FAST)
    assert (again.trained, again.step, again.stopped_early) == (0, 12, 3)


@pytest.mark.slow
def test_two_processes_hold_out_the_same_images_as_one(tmp_path):
    store = make_store(tmp_path / "store", photo_crops(32, 8))
    over = tiny_overrides(**{**AUTO, "train.max_steps": 4, "train.log_every": 2, "train.batch_size": 8})
    train(load_config("tiny", over), store, tmp_path / "one", **FAST)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "latentpatch.cli", "train", "--latents", str(store), "--config", "tiny",
           "--out", str(tmp_path / "two"), "--device", "cpu", "--no-progress", *over]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("held-out: 4 of 32 source images") == 1  # rank 0 says it
    infos = [json.loads((tmp_path / r / "run.json").read_text())["heldout"] for r in ("one", "two")]
    assert infos[0]["files"] == infos[1]["files"] and len(infos[0]["files"]) == 4
    logs = [[(r["step"], r["heldout_loss"]) for r in read_log(tmp_path / r / "log.jsonl") if "heldout_loss" in r]
            for r in ("one", "two")]
    assert [s for s, _ in logs[0]] == [s for s, _ in logs[1]] == [0, 1, 2, 3, 4]
    assert [v for _, v in logs[1]] == pytest.approx([v for _, v in logs[0]], rel=1e-5)


def test_preview_grids_are_labelled_with_their_step_and_heldout_loss(tmp_path, monkeypatch):
    import latentpatch.training.previews as previews

    labels = []
    monkeypatch.setattr(previews, "save_preview_grid", lambda *a, label=None, **kw: labels.append(label))
    store = make_store(tmp_path / "store", photo_crops(32, 8))
    train(auto_config(**{"train.max_steps": 4, "heldout.every": 2, "train.sample_every": 2}), store, tmp_path / "run",
          **FAST)
    held = {r["step"]: r["heldout_loss"] for r in read_log(tmp_path / "run" / "log.jsonl") if "heldout_loss" in r}
    assert labels == [f"step {s}  held-out {held[s]:.4f}" for s in (2, 4)]
