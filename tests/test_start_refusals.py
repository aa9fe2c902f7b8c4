"""The start of a run, tried as a new user would: a refused start writes nothing, a resume keeps the run's record,
a warning is said once, a changed store names what changed, and the held-out and preview choices are right."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import photo, run_main, save_image
from text_helpers import colour_folder, write_clip_config
from trainer_helpers import make_store, photo_crops, tiny_overrides

import latentpatch as lp
from latentpatch.config import load_config
from latentpatch.data.store import LatentStore
from latentpatch.training.trainer import train

FAST = dict(progress=False, device="cpu")


def _folder_bytes(run):
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.suffix != ".lock"}


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """12 images: too few to hold any out, so the run's record carries a held-out note."""
    return make_store(tmp_path_factory.mktemp("small") / "store", photo_crops(12, 16))


def test_a_resume_refused_after_an_edit_of_the_model_writes_nothing(small_store, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train(load_config("tiny", tiny_overrides(**{"train.max_steps": 2, "train.ckpt_every": 2})), small_store, run,
          **FAST)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("hidden_size: 64", "hidden_size: 32"))
    before = _folder_bytes(run)
    code, _, err = run_main(monkeypatch, capsys, "train", "--latents", small_store, "--out", run, "--resume",
                            "--max-steps", 4, "--device", "cpu", "--no-progress")
    assert code == 2 and "does not fit the model built from the run's config" in err, err
    assert _folder_bytes(run) == before  # config.yaml's max_steps, run.json's note, the log: all as they were


def test_a_resume_keeps_the_runs_heldout_note_and_creation_date_and_records_the_new_max_steps(small_store, tmp_path):
    run = tmp_path / "run"
    train(load_config("tiny", tiny_overrides(**{"train.max_steps": 2, "train.ckpt_every": 2, "heldout.share": "null"})),
          small_store, run, **FAST)
    first = json.loads((run / "run.json").read_text())
    assert "fewer than 20" in first["heldout"]["note"]
    train(None, small_store, run, resume=True, max_steps=4, **FAST)
    again = json.loads((run / "run.json").read_text())
    assert again["heldout"] == first["heldout"] and again["created"] == first["created"]
    assert load_config(run / "config.yaml").train.max_steps == 4


def test_a_resume_whose_latest_names_a_deleted_checkpoint_warns_once(small_store, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train(load_config("tiny", tiny_overrides(**{"train.max_steps": 2, "train.ckpt_every": 1})), small_store, run,
          **FAST)
    (run / "checkpoints" / "LATEST").write_text("step-00000009\n")  # deleted by hand
    code, _, err = run_main(monkeypatch, capsys, "train", "--latents", small_store, "--out", run, "--resume",
                            "--max-steps", 3, "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert err.count("names step-00000009, which is missing or incomplete") == 1, err


def test_a_short_run_evaluates_at_its_start_and_end_not_every_step(tmp_path):
    store = make_store(tmp_path / "store", photo_crops(24, 16))
    train(load_config("tiny", tiny_overrides(**{"train.max_steps": 6, "heldout.share": "null"})), store,
          tmp_path / "run", **FAST)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "heldout_loss" in r] == [0, 6]


def test_the_scored_heldout_items_span_every_class_not_the_first_ones(tmp_path):
    """A store encoded class by class, 6 images of each of 10 classes, scored on 20: 2 of each class."""
    from latentpatch.metrics.denoising import scored_rows

    labels = [k // 6 for k in range(60)]
    store = LatentStore(make_store(tmp_path / "store", photo_crops(60, 8), labels=labels))
    rows = scored_rows(store, torch.arange(60), 20, seed=0)
    assert torch.bincount(torch.tensor(labels)[rows], minlength=10).tolist() == [2] * 10
    assert torch.equal(rows, scored_rows(store, torch.arange(60), 20, seed=0)) and rows.tolist() == sorted(rows.tolist())
    assert not torch.equal(rows, scored_rows(store, torch.arange(60), 20, seed=1))
    assert torch.equal(scored_rows(store, torch.arange(10), 20, seed=0), torch.arange(10))  # fewer than the limit


def test_preview_grids_of_a_run_with_a_heldout_share_carry_their_own_captions(tmp_path):
    from latentpatch.conditioning.stored import preview_conditioning
    from latentpatch.distributed import init_distributed
    from latentpatch.training.heldout import heldout_rows
    from latentpatch.training.resolve import resolve_run
    from latentpatch.training.trainer import _Session

    clip = write_clip_config(tmp_path / "clip.json")
    lp.encode(colour_folder(tmp_path / "images", n=24), tmp_path / "store", "pixel", 8, workers=0,
              text_encoder=str(clip))
    store = LatentStore(tmp_path / "store")
    seed = next(s for s in range(100) if 0 in heldout_rows(store, 4 / 24, s).tolist())  # the first "red" held out
    cfg = load_config("tiny", tiny_overrides(**{"heldout.share": 4 / 24, "train.seed": seed, "heldout.every": 5,
                                                 "model.attention": "sdpa"}))
    session = _Session.start(resolve_run(cfg, store, tmp_path / "run"), init_distributed("cpu"))
    cond = preview_conditioning(session.spec, session.cond_rows, store.captions, 3)
    first = [store.captions.index(c) for c in ("red", "green", "blue")]
    cached = store.load(first, names=("text_tokens",))["text_tokens"]
    assert torch.equal(cond.text_tokens, cached[:, : cond.text_tokens.shape[1]].to(cond.text_tokens.dtype))


def _shaped_folder(root, sizes):
    root.mkdir(parents=True)
    for i, size in enumerate(sizes):
        save_image(photo(i % 10, size), root / f"{i:02d}.png")
    return root


def test_a_resume_onto_a_store_reencoded_with_another_bucket_step_names_it(tmp_path, monkeypatch, capsys):
    # 9:7 portrait and landscape, and square: three buckets in steps of 4 px, one (32 x 32) in steps of 8
    images = _shaped_folder(tmp_path / "images", [(56, 72), (72, 56), (48, 48)] * 3)
    store = tmp_path / "store"
    encode = ["encode", images, "--vae", "pixel", "--resolution", 32, "--buckets", "--out", store, "--workers", 0,
              "--no-progress"]
    assert run_main(monkeypatch, capsys, *encode, "--bucket-step", 4)[0] == 0
    run = tmp_path / "run"
    train(load_config("tiny", tiny_overrides(**{"train.max_steps": 1, "heldout.share": 0, "patches.sizes": "[0.25]"})),
          store, run, **FAST)
    buckets_then = LatentStore(store).buckets
    shutil.rmtree(store)
    assert run_main(monkeypatch, capsys, *encode, "--bucket-step", 8)[0] == 0
    assert LatentStore(store).buckets != buckets_then
    code, _, err = run_main(monkeypatch, capsys, "train", "--latents", store, "--out", run, "--resume", "--max-steps",
                            2, "--device", "cpu", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "re-encoded into other aspect buckets (--bucket-step 4 then, 8 now)" in err, err
