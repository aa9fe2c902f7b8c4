"""Two processes (torchrun, gloo on the CPU) train exactly what one process trains on the same global batch."""

import json

import pytest
import torch
from helpers import train_two_processes
from trainer_helpers import assert_same_weights, make_store, photo_crops, tiny_overrides

from latentpatch.config import load_config
from latentpatch.distributed import all_reduce_mean, init_distributed
from latentpatch.training.trainer import train

STEPS = {"train.max_steps": 4, "train.ckpt_every": 100, "train.log_every": 2}


def test_single_process_needs_no_process_group():
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert torch.equal(all_reduce_mean(torch.tensor([3.0]), info), torch.tensor([3.0]))


@pytest.mark.parametrize("recipe", [{}, {"routing.share": 0.5, "routing.start": 0, "routing.end": 0}],
                         ids=["plain", "routed"])
def test_two_gloo_processes_match_one_process(tmp_path, recipe):
    """Every draw (crops, noise, routed tokens) is one of the global batch: 2 ranks compute what 1 does."""
    steps = {**STEPS, **recipe}
    store = make_store(tmp_path / "store", photo_crops(32, 16))
    one = train(load_config("tiny", tiny_overrides(**steps)), store, tmp_path / "one", progress=False, device="cpu")

    proc = train_two_processes(store, tmp_path / "two", tiny_overrides(**steps))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained to step 4") == 1  # rank 0 reports, rank 1 stays quiet

    two = tmp_path / "two" / "checkpoints" / "step-00000004"
    assert_same_weights(one.checkpoint, two, atol=1e-6)
    # Logged losses are the global means, so the two logs agree too.
    log_one = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    log_two = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_two] == [r["step"] for r in log_one] == [2, 4]
    assert [r["loss"] for r in log_two] == pytest.approx([r["loss"] for r in log_one], rel=1e-5)


def test_two_gloo_processes_keep_the_post_hoc_ema_profiles_one_process_keeps(tmp_path):
    """Rank 0 snapshots the profiles every rank updates: the snapshots and the checkpoint's profiles match."""
    from safetensors.torch import load_file

    steps = {**STEPS, "train.posthoc_stds": "[0.05,0.1]", "train.posthoc_every": 2}
    store = make_store(tmp_path / "store", photo_crops(32, 16))
    one = train(load_config("tiny", tiny_overrides(**steps)), store, tmp_path / "one", progress=False, device="cpu")
    proc = train_two_processes(store, tmp_path / "two", tiny_overrides(**steps))
    assert proc.returncode == 0, proc.stderr[-3000:]

    two = tmp_path / "two" / "checkpoints" / "step-00000004"
    snapshot = lambda run, step: tmp_path / run / "posthoc" / "snapshots" / f"step-{step:08d}.safetensors"  # noqa: E731
    pairs = [(one.checkpoint / "posthoc.safetensors", two / "posthoc.safetensors"),
             (snapshot("one", 2), snapshot("two", 2)), (snapshot("one", 4), snapshot("two", 4))]
    for a, b in pairs:
        x, y = load_file(a), load_file(b)
        assert x.keys() == y.keys() and any(k.startswith("std0.100.") for k in x)
        for key in x:
            torch.testing.assert_close(y[key], x[key], rtol=0, atol=1e-6, msg=f"{b}:{key}")
