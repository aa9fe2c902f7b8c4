"""Post-hoc EMA (EDM2, Karras et al. 2024, Sec. 3.1, App. C): power-function profiles, their snapshots during
training, and the least-squares reconstruction of another width afterwards."""

import json

import numpy as np
import pytest
import torch
from helpers import run_main
from safetensors.torch import load_file
from torch import nn
from trainer_helpers import assert_same_weights, make_store, photo_crops, tiny_overrides

from latentpatch.checkpoints import read_state
from latentpatch.config import load_config
from latentpatch.errors import UserError
from latentpatch.metrics.denoising import denoising_loss
from latentpatch.runs import load_run
from latentpatch.training.posthoc_ema import (PosthocProfiles, exp_to_std, power_beta, read_snapshots, reconstruct,
                                              snapshot_path, solve_weights, std_to_exp, write_posthoc_checkpoint)
from latentpatch.training.posthoc_score import run_heldout
from latentpatch.training.trainer import train

# --- the profile ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_rel,gamma", [(0.05, 16.97220), (0.10, 6.93720)])
def test_std_and_exponent_match_the_papers_pairs(sigma_rel, gamma):
    # sigma_rel = sqrt((g+1) / ((g+2)^2 (g+3))): at g = 16.9722, 17.9722/(18.9722^2 * 19.9722) = 0.0025 = 0.05^2.
    assert std_to_exp(sigma_rel) == pytest.approx(gamma, abs=1e-5)
    assert exp_to_std(gamma) == pytest.approx(sigma_rel, rel=1e-6)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.08, 0.15, 0.28])
def test_std_to_exp_inverts_exp_to_std(sigma_rel):
    assert exp_to_std(std_to_exp(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)


@pytest.mark.parametrize("sigma_rel", [0.0, -0.1, 0.29, 0.5])
def test_std_outside_its_range_is_refused_naming_it(sigma_rel):
    with pytest.raises(UserError, match=r"sigma_rel must be in \(0, 0.28\]"):
        std_to_exp(sigma_rel)


def test_power_beta_weights_each_step_by_the_profile_over_it():
    # Constant dt = 3 images, t_k = 3k: the average after n steps is sum_k (t_k^(g+1) - t_(k-1)^(g+1)) x_k / t_n^(g+1),
    # the profile (g+1) tau^g / t^(g+1) integrated over each step, which tends to sum t_k^g x_k / sum t_k^g.
    gamma, dt, n = 6.9372, 3.0, 400
    x = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    avg = 0.0
    for k in range(1, n + 1):
        beta = power_beta(gamma, k * dt, dt)
        avg = beta * avg + (1 - beta) * float(x[k - 1])
    t = dt * torch.arange(0, n + 1, dtype=torch.float64)
    exact = ((t[1:] ** (gamma + 1) - t[:-1] ** (gamma + 1)) * x).sum() / t[-1] ** (gamma + 1)
    assert avg == pytest.approx(float(exact), rel=1e-12, abs=1e-12)
    point = (t[1:] ** gamma * x).sum() / (t[1:] ** gamma).sum()
    assert avg == pytest.approx(float(point), abs=0.01)  # the discrete profile differs by O(gamma / n)
    assert power_beta(gamma, dt, dt) == 0.0  # the first step replaces the initial weights


def test_a_profile_at_a_snapshot_is_reconstructed_by_weight_one_on_it():
    snapshots = [(g, t) for t in (100.0, 200.0, 300.0) for g in (std_to_exp(0.05), std_to_exp(0.10))]
    w = solve_weights(snapshots, std_to_exp(0.05), 200.0)
    np.testing.assert_allclose(w, [0, 0, 1, 0, 0, 0], atol=1e-6)


def test_weights_do_not_depend_on_the_unit_of_time_and_survive_huge_counts():
    snapshots = [(g, t) for t in (1.0, 2.0, 3.0, 4.0) for g in (std_to_exp(0.05), std_to_exp(0.10))]
    small = solve_weights(snapshots, std_to_exp(0.08), 4.0)
    huge = solve_weights([(g, t * 1e12) for g, t in snapshots], std_to_exp(0.08), 4e12)  # t^35 overflows float64
    np.testing.assert_allclose(huge, small, rtol=1e-9, atol=1e-9)


class _Walker(nn.Module):
    """A 'model' whose parameter a test sets to each step of a random walk (and a buffer, copied as it is)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(64))
        self.register_buffer("seen", torch.zeros(()))


def test_reconstructing_a_third_std_matches_that_ema_computed_directly(tmp_path):
    # 2000 steps of a 64-dim random walk; profiles 0.05 and 0.10 snapshotted every 50 steps, and 0.08 kept
    # directly by the same update. The least-squares fit is of the continuous profiles; the discrete updates
    # follow them to O(1/steps): measured 1e-5 of the EMA's distance from the walk's mean, asserted at 1e-3.
    walk = torch.randn(2000, 64, generator=torch.Generator().manual_seed(0)).cumsum(0)
    model = _Walker()
    profiles, direct = PosthocProfiles(model, [0.05, 0.10]), PosthocProfiles(model, [0.08])
    for k in range(1, 2001):
        with torch.no_grad():
            model.w.copy_(walk[k - 1])
            model.seen.fill_(k)
        profiles.update(model, t=8.0 * k, dt=8.0)  # 8 images a step: time in images, not steps
        direct.update(model, t=8.0 * k, dt=8.0)
        if k % 50 == 0:
            profiles.snapshot(snapshot_path(tmp_path, k), k, 8.0 * k)
    state, info = reconstruct(tmp_path, 0.08)
    target = direct.copies[0].w.detach()
    error = (state["w"] - target).norm() / (target - walk.mean(0)).norm()
    assert error < 1e-3, error
    assert state["seen"] == 2000  # a buffer is the newest snapshot's, not a weighted sum
    assert info["step"] == 2000 and len(info["snapshots"]) == 80

    state, info = reconstruct(tmp_path, 0.05, step=1024)  # the last snapshot at or before step 1024
    weights = {(s["step"], s["std"]): s["weight"] for s in info["snapshots"]}
    assert info["step"] == 1000 and weights[(1000, 0.05)] == pytest.approx(1, abs=1e-6)
    assert sum(abs(w) for key, w in weights.items() if key != (1000, 0.05)) < 1e-5
    snap = load_file(snapshot_path(tmp_path, 1000))
    torch.testing.assert_close(state["w"], snap["std0.050.w"], rtol=0, atol=1e-5)


# --- in training ------------------------------------------------------------------------------------------

ON = {"train.max_steps": 12, "train.ckpt_every": 4, "train.posthoc_stds": "[0.05,0.1]", "train.posthoc_every": 4}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store"), photo_crops(32, 16))


@pytest.fixture(scope="module")
def whole(store, tmp_path_factory):
    """An uninterrupted 12-step run with two profiles, snapshotted every 4 steps."""
    return train(load_config("tiny", tiny_overrides(**ON)), store, tmp_path_factory.mktemp("whole") / "run",
                 progress=False, device="cpu")


def test_a_run_snapshots_its_profiles_and_the_last_one_reconstructs_exactly(whole):
    run = whole.run_dir
    assert [s.step for s in read_snapshots(run)] == [4, 8, 12]
    assert read_snapshots(run)[-1].stds == [0.05, 0.1]
    state, _ = reconstruct(run, 0.05)
    snap = load_file(snapshot_path(run, 12))
    assert state.keys() == {k[len("std0.050."):] for k in snap if k.startswith("std0.050.")}
    for name, value in state.items():
        torch.testing.assert_close(value, snap[f"std0.050.{name}"], rtol=0, atol=1e-6)


def test_profiles_leave_training_unchanged_and_off_writes_what_it_always_wrote(whole, store, tmp_path):
    off = train(load_config("tiny", tiny_overrides(**{k: v for k, v in ON.items() if "posthoc" not in k})), store,
                tmp_path / "off", progress=False, device="cpu")
    assert_same_weights(off.checkpoint, whole.checkpoint)  # bit for bit: the profiles only read the weights
    assert sorted(p.name for p in off.checkpoint.iterdir()) == [
        "ema.safetensors", "model.safetensors", "optimizer.safetensors", "state.json"]
    assert not (tmp_path / "off" / "posthoc").exists()
    plain, with_profiles = read_state(off.checkpoint), read_state(whole.checkpoint)
    assert set(with_profiles["files"]) - set(plain["files"]) == {"posthoc.safetensors"}
    measured = {"files", "train_s"}  # train_s is this process's own measured time, never equal between two runs
    assert {k: v for k, v in with_profiles.items() if k not in measured} == {
        k: v for k, v in plain.items() if k not in measured}
    assert load_config("tiny", tiny_overrides(**{"train.posthoc_stds": "[]"})) == load_config("tiny", tiny_overrides())


def test_stopped_and_resumed_run_continues_its_profiles_exactly(whole, store, tmp_path):
    cfg = load_config("tiny", tiny_overrides(**ON))
    train(cfg, store, tmp_path / "split", max_steps=8, progress=False, device="cpu")
    resumed = train(cfg, store, tmp_path / "split", resume=True, progress=False, device="cpu")
    assert resumed.step == 12
    assert_same_weights(whole.checkpoint, resumed.checkpoint)
    name = "posthoc.safetensors"
    assert (whole.checkpoint / name).read_bytes() == (resumed.checkpoint / name).read_bytes()
    for snap in read_snapshots(whole.run_dir):
        assert snapshot_path(tmp_path / "split", snap.step).read_bytes() == snap.path.read_bytes(), snap.step
    assert [s.step for s in read_snapshots(tmp_path / "split")] == [4, 8, 12]


def test_ema_command_writes_checkpoints_that_sample_loads(whole, tmp_path, monkeypatch, capsys):
    run = whole.run_dir
    code, out, err = run_main(monkeypatch, capsys, "ema", run, "--std", "0.05,0.08")
    assert code == 0, err
    folder = run / "posthoc" / "std-0.080-step-00000012"
    assert f"std 0.080: {folder}" in out
    state = read_state(folder)
    assert state["step"] == 12 and set(state["files"]) == {"ema.safetensors"}
    assert state["posthoc"]["sigma_rel"] == 0.08 and len(state["posthoc"]["snapshots"]) == 6
    loaded = load_run(run, checkpoint=folder)
    assert loaded.step == 12 and loaded.weights == "ema"
    with pytest.raises(UserError, match="post-hoc EMA reconstruction.*weights 'ema'"):
        load_run(run, checkpoint=folder, weights="raw")
    code, out, err = run_main(monkeypatch, capsys, "sample", run, "--checkpoint", folder, "--n", 1, "--steps", 2,
                              "--out", tmp_path / "samples", "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert (tmp_path / "samples" / "00000000.png").is_file()


def test_ema_score_ranks_reconstructions_by_the_runs_own_heldout_loss(store, tmp_path, monkeypatch, capsys):
    overrides = {**ON, "train.max_steps": 8, "heldout.share": 0.25, "heldout.every": 4, "train.patience": 0}
    run = train(load_config("tiny", tiny_overrides(**overrides)), store, tmp_path / "run", progress=False,
                device="cpu").run_dir
    # The rebuilt held-out set scores the run's own EMA to the number the training log shows.
    logged = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if "heldout_loss" in x][-1]
    assert logged["step"] == 8
    ema = load_run(run, checkpoint="latest").precond
    assert denoising_loss(ema, run_heldout(run).heldout).mean == logged["heldout_loss"]

    capsys.readouterr()  # the run's own lines
    code, out, err = run_main(monkeypatch, capsys, "ema", run, "--std", "0.05,0.1,0.2", "--score", "--device", "cpu")
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[1:]]
    losses = [float(r[1]) for r in rows]
    assert [r[0] for r in rows] == ["0.050", "0.100", "0.200"]
    assert [r[-1] == "lowest" for r in rows] == [loss == min(losses) for loss in losses]
    assert (run / "posthoc" / "std-0.200-step-00000008" / "ema.safetensors").is_file()


def test_ema_help_explains_a_relative_std_and_the_key_a_run_needs():
    from typer.testing import CliRunner

    from latentpatch.cli.app import app

    result = CliRunner().invoke(app, ["ema", "--help"], terminal_width=200)
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 0
    for phrase in ("share of the training time", "0.05 short, 0.15 long", "0.05-0.15", "train.posthoc_stds",
                   "--std", "--step", "--score", "held-out loss"):
        assert phrase in text, phrase


# --- bad input: one line, nothing written ---------------------------------------------------------------------


@pytest.mark.parametrize("stds,message", [("0", "must be in (0, 0.28]"), ("0.5", "must be in (0, 0.28]"),
                                          ("0.1,0.05", "must be sorted"), ("0.0505", "at most 3 decimals")])
def test_bad_config_stds_are_refused(store, tmp_path, monkeypatch, capsys, stds, message):
    code, _, err = run_main(monkeypatch, capsys, "train", "--latents", store, "--config", "tiny", "--out",
                            tmp_path / "run", "--device", "cpu", f"train.posthoc_stds=[{stds}]")
    assert code == 2 and err.count("\n") == 1 and "train.posthoc_stds must be" in err and message in err, err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_ema_on_a_run_without_profiles_names_the_key(tiny_run, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "ema", tiny_run, "--std", "0.1")
    assert code == 2 and err.count("\n") == 1 and "train.posthoc_stds" in err
    assert not (tiny_run / "posthoc").exists()


@pytest.mark.parametrize("args,message", [
    (["--std", "0.1", "--step", "3"], "no post-hoc EMA snapshot at or before step 3 (the first is at step 4)"),
    (["--std", "0.1,0.3"], r"--std must be in (0, 0.28]"),
    (["--std", "a,b"], "--std takes a comma list"),
])
def test_ema_bad_input_is_one_line_and_writes_nothing(whole, monkeypatch, capsys, args, message):
    before = sorted((whole.run_dir / "posthoc").iterdir())
    code, _, err = run_main(monkeypatch, capsys, "ema", whole.run_dir, *args)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert sorted((whole.run_dir / "posthoc").iterdir()) == before


def test_write_posthoc_checkpoint_names_its_folder_by_std_and_step(whole):
    folder = write_posthoc_checkpoint(whole.run_dir, 0.1, step=9)
    assert folder.name == "std-0.100-step-00000008" and read_state(folder)["posthoc"]["step"] == 8
