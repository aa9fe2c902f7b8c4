"""Checkpoints: safetensors round trips, atomic writes, the retention rule and load_run's checks."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from torch import nn

from latentpatch import checkpoints as ck
from latentpatch.config import load_config, save_config
from latentpatch.denoiser import build_precond
from latentpatch.errors import Notice, UserError
from latentpatch.runs import load_run
from latentpatch.training.ema import make_ema


def _trained_modules(steps: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    ema = make_ema(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
    return model, ema, opt


def _fresh_modules():
    return _trained_modules(steps=0, seed=1)


def _save(run, step, modules=None, keep=0):
    model, ema, opt = modules or _trained_modules()
    return ck.save_checkpoint(run, step, model, ema, opt, {"nimg": float(step), "kimg": step / 1000}, keep=keep)


def test_round_trip_restores_weights_ema_and_optimizer_exactly(tmp_path):
    model, ema, opt = _trained_modules()
    path = ck.save_checkpoint(tmp_path, 3, model, ema, opt, {"nimg": 15.0}, keep=0)
    model2, ema2, opt2 = _fresh_modules()
    state = ck.load_checkpoint(path, model2, ema2, opt2)
    assert state["step"] == 3 and state["nimg"] == 15.0
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), ema2.state_dict().values()):
        assert torch.equal(a, b)
    # The next optimiser step is bit-identical: moments and step counts came back.
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_files_are_safetensors_with_optimizer_metadata_as_json(tmp_path):
    path = _save(tmp_path, 1)
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors", "model.safetensors", "optimizer.safetensors", "state.json"]
    with safe_open(path / "optimizer.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["optimizer"])
        assert {"0.exp_avg", "0.exp_avg_sq", "0.step"} <= set(f.keys())
    assert meta["param_groups"][0]["weight_decay"] == 0.1
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step-00000001"


def test_retention_keeps_the_newest(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]


def test_retention_never_deletes_the_checkpoint_latest_names(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    (tmp_path / "checkpoints" / "LATEST").write_text("step-00000001\n")
    ck.apply_retention(tmp_path, keep=1)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000001", "step-00000003"]


def test_leftover_tmp_folder_is_ignored_and_cleaned_by_the_next_save(tmp_path):
    _save(tmp_path, 5)
    junk = tmp_path / "checkpoints" / ".tmp-step-00000009"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"half a file")
    (junk / "state.json").write_text("{}")
    assert ck.latest_checkpoint(tmp_path).name == "step-00000005"
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000005"]
    _save(tmp_path, 6)
    assert not junk.exists()


def test_a_crash_while_writing_leaves_the_previous_checkpoint_current(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    real = ck._write_synced

    def dying(path, data):
        if path.name == "optimizer.safetensors":
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(ck, "_write_synced", dying)
    with pytest.raises(UserError, match="could not write checkpoint .*step-00000002: disk full"):
        _save(tmp_path, 2)
    assert ck.latest_checkpoint(tmp_path).name == "step-00000001"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert not (tmp_path / "checkpoints" / "step-00000002").exists()


def test_missing_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    (tmp_path / "checkpoints" / "LATEST").unlink()
    assert ck.latest_checkpoint(tmp_path).name == "step-00000002"


def _run_folder(tmp_path):
    """A run folder with config.yaml, run.json and one checkpoint of the tiny DiT."""
    cfg = load_config("tiny", ["edm.sigma_data=0.5"])
    save_config(cfg, tmp_path / "config.yaml")
    (tmp_path / "run.json").write_text(json.dumps({"latent_shape": [3, 8, 8]}))
    torch.manual_seed(0)
    precond = build_precond(cfg, 3, device="cpu")
    opt = torch.optim.AdamW(precond.parameters())
    ema = make_ema(precond)
    with torch.no_grad():
        next(ema.parameters()).add_(1.0)  # so EMA and raw weights differ
    return ck.save_checkpoint(tmp_path, 7, precond, ema, opt, {"nimg": 7.0}), precond, ema


def test_load_run_returns_the_ema_or_raw_denoiser_in_eval_mode(tmp_path):
    path, precond, ema = _run_folder(tmp_path)
    run = load_run(tmp_path)
    assert run.step == 7 and run.checkpoint == path and not run.precond.training
    assert run.checkpoint_id == ck.sha256_file(path / "ema.safetensors")[:16]
    for a, b in zip(run.precond.state_dict().values(), ema.state_dict().values()):
        assert torch.equal(a, b)
    raw = load_run(tmp_path, weights="raw", checkpoint=7)
    for a, b in zip(raw.precond.state_dict().values(), precond.state_dict().values()):
        assert torch.equal(a, b)


def test_load_run_refuses_a_tampered_or_truncated_weights_file(tmp_path):
    path, _, _ = _run_folder(tmp_path)
    data = (path / "ema.safetensors").read_bytes()
    (path / "ema.safetensors").write_bytes(data[:-10])
    with pytest.raises(UserError, match="truncated or changed"):
        load_run(tmp_path)
    (path / "ema.safetensors").write_bytes(data[:-4] + b"\0\0\0\1")
    with pytest.raises(UserError, match="truncated or changed"):
        load_run(tmp_path)


def test_load_run_refuses_folders_that_are_not_runs(tmp_path):
    with pytest.raises(UserError, match="config.yaml is missing"):
        load_run(tmp_path)
    save_config(load_config("tiny"), tmp_path / "config.yaml")
    (tmp_path / "run.json").write_text(json.dumps({"latent_shape": [3, 8, 8]}))
    with pytest.raises(UserError, match="no checkpoint yet"):
        load_run(tmp_path)
    with pytest.raises(UserError, match="'ema' or 'raw'"):
        load_run(tmp_path, weights="best")


def test_latest_naming_a_deleted_checkpoint_says_which_one_it_takes_instead(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    _save(tmp_path, 3)
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000003")  # LATEST still names it
    with pytest.warns(Notice, match=r"LATEST names step-00000003, which is missing or incomplete \(deleted\?\); "
                                    r"using step-00000002, the newest complete checkpoint"):
        assert ck.resolve_checkpoint(tmp_path, "latest").name == "step-00000002"


def test_best_naming_a_deleted_checkpoint_is_refused_or_said(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    (tmp_path / "checkpoints" / "BEST").write_text("step-00000001\n")
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000001")
    with pytest.raises(UserError, match="BEST names step-00000001, which is missing or incomplete"):
        ck.resolve_checkpoint(tmp_path, "best")
    with pytest.warns(Notice, match="BEST names step-00000001.*; using the latest checkpoint instead"):
        assert ck.resolve_checkpoint(tmp_path, None).name == "step-00000002"


def test_weights_of_another_model_size_are_refused_naming_the_first_tensor_and_both_shapes(tmp_path):
    model, ema, opt = _trained_modules()
    path = ck.save_checkpoint(tmp_path, 1, model, ema, opt, {"nimg": 1.0}, keep=0)
    wider = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 2))
    with pytest.raises(UserError) as refused:
        ck.load_weights(wider, path / "model.safetensors")
    assert str(refused.value) == (
        f"{path / 'model.safetensors'} does not fit the model built from the run's config: tensor 0.weight is "
        "[8, 4] in the checkpoint and [16, 4] in the model (2 more like it); was the run's config.yaml edited after "
        "this checkpoint was written?")
    deeper = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2), nn.Linear(2, 2))
    with pytest.raises(UserError, match="the checkpoint has no tensor 3.weight \\(1 more like it\\)"):
        ck.load_weights(deeper, path / "model.safetensors")
