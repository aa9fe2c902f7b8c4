"""A latent store's identity (its images, through which autoencoder) and the resume check that reads it from
run.json: a resume continues on the images a run started with, or is refused saying what changed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import make_image_folder
from trainer_helpers import make_store, photo_crops

from latentpatch.cli.app import main
from latentpatch.data.manifest import read_manifest

TRAIN = ["--config", "tiny", "--device", "cpu", "--no-progress", "train.ckpt_every=1", "model.attention=sdpa"]


def _main(monkeypatch, capsys, args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["latentpatch", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code or 0, capsys.readouterr().err


def _train(monkeypatch, capsys, store: Path, run: Path, *extra) -> tuple[int, str]:
    return _main(monkeypatch, capsys, ["train", "--latents", store, "--out", run, *extra])


def _resume(monkeypatch, capsys, store: Path, run: Path, steps: int = 2) -> tuple[int, str]:
    return _main(monkeypatch, capsys, ["train", "--latents", store, "--out", run, "--resume", "--device", "cpu",
                                       "--no-progress", "--max-steps", steps])


def _encode(monkeypatch, capsys, images: Path, store: Path) -> None:
    code, err = _main(monkeypatch, capsys, ["encode", images, "--vae", "pixel", "--resolution", 16, "--out", store,
                                            "--workers", 0, "--no-progress"])
    assert code == 0, err


def test_identity_is_the_images_not_their_order_paths_or_captions(tmp_path):
    make_store(tmp_path / "a", photo_crops(4, 16))
    a = read_manifest(tmp_path / "a")
    b = read_manifest(tmp_path / "a")
    b.items.reverse()
    for item in b.items:
        item.file, item.caption = "elsewhere/" + item.file, "a caption"
    assert a.identity == b.identity and len(a.identity) == 64
    b.items[0].sha256 = "f" * 64  # another image
    assert a.identity != b.identity
    b.items[0].sha256, b.items[0].flip = a.items[-1].sha256, True  # the same image, mirrored
    assert a.identity != b.identity
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["identity"] == a.identity


def test_resume_onto_another_store_is_refused_and_says_how_to_fine_tune(tmp_path, monkeypatch, capsys):
    make_image_folder(tmp_path / "images", n=3, size=16, formats=("png",))
    make_image_folder(tmp_path / "others", n=3, size=16, formats=("png",), start=10)
    _encode(monkeypatch, capsys, tmp_path / "images", tmp_path / "store")
    _encode(monkeypatch, capsys, tmp_path / "others", tmp_path / "other")
    run = tmp_path / "run"
    code, err = _train(monkeypatch, capsys, tmp_path / "store", run, *TRAIN, "--max-steps", 1)
    assert code == 0, err
    before = (run / "run.json").read_bytes()
    assert json.loads(before)["store"] == {"identity": read_manifest(tmp_path / "store").identity, "images": 3}

    code, err = _resume(monkeypatch, capsys, tmp_path / "other", run)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: --resume: run {run} was trained on store {(tmp_path / 'store').resolve()} "
                          f"(3 images), but store {tmp_path / 'other'} holds other images (3)"), err
    assert f"fine-tune from the run: latentpatch train --base {run} --latents {tmp_path / 'other'} --out NEW" in err
    assert (run / "run.json").read_bytes() == before  # still names the run's own store


def test_resume_onto_its_store_grown_by_a_later_encode_says_how_many_images_were_added(tmp_path, monkeypatch,
                                                                                          capsys):
    images, store, run = tmp_path / "images", tmp_path / "store", tmp_path / "run"
    make_image_folder(images, n=2, size=16, formats=("png",))
    _encode(monkeypatch, capsys, images, store)
    code, err = _train(monkeypatch, capsys, store, run, *TRAIN, "--max-steps", 1)
    assert code == 0, err
    make_image_folder(images, n=3, size=16, formats=("png",), start=2)  # three more in the same folder
    _encode(monkeypatch, capsys, images, store)

    code, err = _resume(monkeypatch, capsys, store, run)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: --resume: store {store} has changed since run {run} started on it "
                          "(3 images added: 2 then, 5 now); a resume continues on the images the run started with"), err
    assert f"latentpatch train --base {run} --latents {store} --out NEW" in err


def test_a_run_recorded_before_identities_resumes_and_records_its_store_from_then_on(tmp_path, monkeypatch, capsys):
    make_store(tmp_path / "store", photo_crops(4, 16))
    run = tmp_path / "run"
    code, err = _train(monkeypatch, capsys, tmp_path / "store", run, *TRAIN, "--max-steps", 1)
    assert code == 0, err
    info = json.loads((run / "run.json").read_text())
    recorded = info.pop("store")
    (run / "run.json").write_text(json.dumps(info))  # as written before stores had an identity

    code, err = _resume(monkeypatch, capsys, tmp_path / "store", run)
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())["store"] == recorded
