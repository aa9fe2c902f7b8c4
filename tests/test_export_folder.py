"""The export folder: which checkpoint it takes and what its model card says, what it refuses (each in one line,
nothing written or lost), LoRA modes by network, and the `latentpatch export` command."""

import json
import sys

import pytest
import torch
from export_helpers import dit_run, finetune_run
from pretrained_helpers import make_dit_pipeline
from safetensors.torch import load_file, save
from typer.testing import CliRunner

import latentpatch as lp
from latentpatch import checkpoints as ckpt
from latentpatch.errors import UserError
from latentpatch.exporting.network import plain_weights
from latentpatch.runs import load_run

HELDOUT = {1: 0.5, 2: 0.3, 3: 0.4}  # BEST is step 2, LATEST step 3


@pytest.fixture
def run(tmp_path):
    return dit_run(tmp_path / "run", num_classes=2, steps=tuple(HELDOUT), heldout=HELDOUT)


def exported_weights(out):
    return load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")


def assert_weights_of(out, run, checkpoint):
    net = load_run(run, checkpoint=checkpoint).precond.net
    want, have = plain_weights(net), exported_weights(out)
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)


@pytest.mark.parametrize("checkpoint,step,which,loss", [(None, 2, "BEST", 0.3), ("BEST", 2, "BEST", 0.3),
                                                        ("latest", 3, "latest", 0.4), ("1", 1, "named", 0.5)])
def test_the_export_takes_the_checkpoint_sample_would_or_the_one_named_and_says_which(run, tmp_path, checkpoint,
                                                                                      step, which, loss):
    out = lp.export(run, tmp_path / "out", checkpoint=checkpoint)
    assert_weights_of(out, run, None if checkpoint == "BEST" else checkpoint)
    record = json.loads((out / "export.json").read_text())
    assert record["checkpoint"]["step"] == step and record["checkpoint"]["which"].startswith(which)
    assert record["heldout_loss"] == {"loss": loss, "step": step}
    card = (out / "README.md").read_text()
    for line in (f"| steps | {step} |", f"| held-out loss | {loss:.4f} |", "| data | 24 images at [8, 8] px",
                 f"| exported by | latentpatch {lp.__version__} |", "DiT trained from scratch by latentpatch",
                 'DiffusionPipeline.from_pretrained(', "trust_remote_code=True"):
        assert line in card, line


def test_a_post_hoc_ema_folder_exports_its_weights_and_no_held_out_loss(run, tmp_path):
    tensors = load_file(ckpt.best_checkpoint(run) / "ema.safetensors")
    tensors = {k: v + 0.01 for k, v in tensors.items()}
    folder = ckpt.write_checkpoint_folder(run / "posthoc" / "std-0.100-step-00000003",
                                          {"ema.safetensors": save(tensors)},
                                          {"step": 3, "posthoc": {"sigma_rel": 0.1}}, "nothing")
    out = lp.export(run, tmp_path / "out", checkpoint=folder)
    assert_weights_of(out, run, folder)
    record = json.loads((out / "export.json").read_text())
    assert record["checkpoint"]["which"] == "post-hoc EMA reconstruction" and record["heldout_loss"] is None


def test_an_existing_out_is_refused_without_force_and_replaced_with_it(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="out exists; pass --force"):
        lp.export(run, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    lp.export(run, out, force=True)
    assert not (out / "mine.txt").exists() and (out / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no staging folder left


def test_a_failed_export_leaves_out_as_it_was(run, tmp_path, monkeypatch):
    from latentpatch.exporting import coordinate_pipeline

    out = lp.export(run, tmp_path / "out")
    before = exported_weights(out)

    def fails(loaded, folder, *args):
        (folder / "half.txt").write_text("half-written")
        raise UserError("disk full")

    monkeypatch.setattr(coordinate_pipeline, "write", fails)
    with pytest.raises(UserError, match="disk full"):
        lp.export(run, out, force=True, checkpoint="latest")
    assert not (out / "half.txt").exists() and exported_weights(out).keys() == before.keys()
    assert all(torch.equal(exported_weights(out)[k], v) for k, v in before.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]


def test_what_cannot_be_exported_is_refused_in_one_line(tmp_path):
    from tiny_runs import make_tiny_run

    bare = make_tiny_run(tmp_path / "bare", checkpoint=False)
    with pytest.raises(UserError, match="has no checkpoint yet"):
        lp.export(bare, tmp_path / "a")
    run = dit_run(tmp_path / "run")
    with pytest.raises(UserError, match="checkpoint '7' not found"):
        lp.export(run, tmp_path / "a", checkpoint=7)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "format_version": 2}))
    with pytest.raises(UserError, match="format_version 2; latentpatch .* reads format 1: upgrade"):
        lp.export(run, tmp_path / "a")
    with pytest.raises(UserError, match="would replace the run folder"):
        lp.export(run, tmp_path, force=True)
    with pytest.raises(UserError, match="unknown sampler 'ddim'"):
        lp.export(run, tmp_path / "a", sampler="ddim")
    assert not (tmp_path / "a").exists()


def test_lora_modes_by_network(tmp_path):
    plain = dit_run(tmp_path / "plain")
    with pytest.raises(UserError, match="no LoRA adapters"):
        lp.export(plain, tmp_path / "a", lora="merged")
    lora_dit = dit_run(tmp_path / "lora", overrides=("model.lora_rank=2",))
    with pytest.raises(UserError, match="separate needs a network whose diffusers pipeline loads LoRA files.*DiT: export it with --lora merged"):
        lp.export(lora_dit, tmp_path / "a", lora="separate")
    out = lp.export(lora_dit, tmp_path / "a")  # merged: the default where separate cannot apply
    assert json.loads((out / "export.json").read_text())["lora"] == "merged" and not (out / "lora").exists()
    assert_weights_of(out, lora_dit, None)  # the merged weights load_run samples with
    assert not any("lora" in k for k in exported_weights(out))


def test_a_fine_tuned_base_exports_heun_or_euler_only(tmp_path):
    run = finetune_run(tmp_path / "run", make_dit_pipeline(tmp_path / "dit"))
    with pytest.raises(UserError, match="--sampler dpmpp_2m: a fine-tuned pretrained base exports with heun or euler"):
        lp.export(run, tmp_path / "a", sampler="dpmpp_2m")
    card = (lp.export(run, tmp_path / "b") / "README.md").read_text()
    assert "fine-tune of" in card and "DiTTransformer2DModel" in card and "the base's own VP (epsilon)" in card


def test_the_export_command_writes_the_folder_and_refuses_an_existing_one(run, tmp_path, monkeypatch, capsys):
    from latentpatch.cli.app import app, main

    runner = CliRunner()
    out = tmp_path / "out"
    done = runner.invoke(app, ["export", str(run), str(out), "--checkpoint", "latest"])
    assert done.exit_code == 0, done.output
    assert "LatentPatchDiT + EDMHeunScheduler from step-00000003 (latest, step 3)" in done.output
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == ["pipeline_latentpatch",
                                                                                 "LatentPatchPipeline"]
    monkeypatch.setattr(sys, "argv", ["latentpatch", "export", str(run), str(out)])
    with pytest.raises(SystemExit) as refused:
        main()
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {out} exists; pass --force (force=True) to replace it"
    assert runner.invoke(app, ["export", str(run), str(out), "--force", "--sampler", "euler"]).exit_code == 0
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == ["diffusers", "EDMEulerScheduler"]
