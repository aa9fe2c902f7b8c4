"""Recipe switches of the trainer: token routing, torch.compile, aligned crops."""

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import make_store, photo_crops, tiny_overrides

from latentpatch.conditioning import ConditioningSpec
from latentpatch.config import load_config
from latentpatch.data.store import LatentStore
from latentpatch.sampling.generate import sample
from latentpatch.patches import PatchSchedule
from latentpatch.training.batches import BatchSpec, draw_batch
from latentpatch.training.rows import TrainingRows
from latentpatch.training.trainer import train

ROUTED = {"routing.share": 0.5, "routing.start": 0, "routing.end": 0}  # tiny has 2 blocks: route block 0
FAST = dict(progress=False, device="cpu")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store"), photo_crops(32, 16, seed=0))


def tiny(**extra):
    return load_config("tiny", tiny_overrides(**extra))


def _weights(run, step, name="model.safetensors"):
    return load_file(run / "checkpoints" / f"step-{step:08d}" / name)


def _resumes_exactly_and_changes_training(recipe: dict, store, tmp_path, steps: int) -> None:
    """A run with `recipe` stopped halfway and resumed equals the uninterrupted one, which differs from plain."""
    over = {**recipe, "train.max_steps": steps, "train.ckpt_every": steps // 2}
    train(tiny(**over), store, tmp_path / "whole", **FAST)
    train(tiny(**over), store, tmp_path / "split", max_steps=steps // 2, **FAST)
    train(None, store, tmp_path / "split", resume=True, max_steps=steps, **FAST)
    a, b = _weights(tmp_path / "whole", steps), _weights(tmp_path / "split", steps)
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = train(tiny(**{"train.max_steps": steps, "train.ckpt_every": steps // 2}), store, tmp_path / "plain",
                  **FAST)
    c = load_file(plain.checkpoint / "model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the recipe really changed training


def test_a_routed_run_resumes_exactly_and_samples_at_full_size_with_every_token(store, tmp_path):
    _resumes_exactly_and_changes_training(ROUTED, store, tmp_path, steps=8)
    seen = []
    from latentpatch.runs import load_run

    run = load_run(tmp_path / "whole")
    run.precond.net.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    images = sample(run, n=2, steps=3, output="tensor")
    assert images.shape == (2, 3, 16, 16) and set(seen) == {64}  # all 8 x 8 tokens of a 16 x 16 latent


def test_routing_share_zero_trains_exactly_the_plain_dit(store, tmp_path):
    over = {"train.max_steps": 3, "train.ckpt_every": 3}
    a = train(tiny(**over, **{"routing.share": 0.0, "routing.start": 0, "routing.end": 0}), store, tmp_path / "a",
              **FAST)
    b = train(tiny(**over), store, tmp_path / "b", **FAST)
    wa, wb = load_file(a.checkpoint / "model.safetensors"), load_file(b.checkpoint / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_routed_batch_keeps_half_the_tokens_of_its_patch(store):
    cfg = tiny(**ROUTED)
    spec = BatchSpec.from_config(cfg, ConditioningSpec(), size_multiple=2)
    rows = TrainingRows.from_store(LatentStore(store), {}, None)
    stage = PatchSchedule(cfg.patches, 16, 16, 8, multiple_of=2).stages[-1]
    batch = draw_batch(rows, spec, stage, 8, step=4, micro=0, rank=0, world=1, device=torch.device("cpu"))
    assert batch.route.keep.shape == (8, 32) and (batch.route.start, batch.route.end) == (0, 0)  # 64 tokens, half


def test_compiled_training_has_one_static_graph_per_patch_stage_and_no_recompiles(store, tmp_path, monkeypatch):
    """torch.compile(dynamic=False): each of the 3 stages compiles once (dynamo's counters), then never again."""
    import functools

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))  # dynamo, not inductor
    seen = []

    def callback(info):
        seen.append((info.step, info.patch, counters["stats"]["unique_graphs"], counters["frames"]["total"]))

    over = {"train.compile": "true", "train.max_steps": 16, "patches.sizes": "[0.25, 0.5]"}
    train(tiny(**over), store, tmp_path / "run", callback=callback, **FAST)
    stages = {patch for _, patch, _, _ in seen}
    assert stages == {(4, 4), (8, 8), (16, 16)}
    warm = max(next(i for i, s in enumerate(seen) if s[1] == patch) for patch in stages)  # every stage seen once
    assert seen[-1][2] == 3 and seen[-1][3] == 3  # a static graph each, no dynamic-shape graph, no graph break
    assert all(s[2:] == seen[warm][2:] for s in seen[warm:])  # nothing compiled after warm-up
    torch._dynamo.reset()


def test_crops_go_anywhere_by_default_and_on_the_token_grid_when_aligned():
    """The default follows the speed-to-quality measurement (any offset); `patches.aligned` puts offsets on the
    network's token grid, and a pretrained DiT base turns it on."""
    spec = ConditioningSpec()
    assert BatchSpec.from_config(load_config("tiny"), spec, size_multiple=2).crop_multiple == 1
    aligned = load_config("tiny", ["patches.aligned=true"])
    assert BatchSpec.from_config(aligned, spec, size_multiple=2).crop_multiple == 2
    assert BatchSpec.from_config(load_config("patch-latent"), spec, size_multiple=2).crop_multiple == 1
