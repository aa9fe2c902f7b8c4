"""A sampling job runs each distinct prompt through the text tower once (on its own, so its embedding does not
depend on its batch-mates), and its images stay those of the per-batch embeddings to float rounding."""

import pytest
import torch
from text_helpers import colour_folder, write_clip_config

import latentpatch as lp
from latentpatch.config import load_config
from latentpatch.runs import load_run
from latentpatch.sampling import generate
from latentpatch.text.loader import load_text_encoder
from latentpatch.text.memo import MemoEncoder


@pytest.fixture(scope="module")
def clip_json(tmp_path_factory):
    return write_clip_config(tmp_path_factory.mktemp("clip") / "tiny-clip.json")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, clip_json):
    root = tmp_path_factory.mktemp("memo")
    lp.encode(colour_folder(root / "images", n=6), root / "store", "pixel", 8, workers=0, dtype="float32",
              text_encoder=str(clip_json))
    cfg = load_config("tiny", ["train.max_steps=2", "train.batch_size=4", "train.ckpt_every=2",
                               "optim.warmup_steps=1", "model.attention=sdpa"])
    lp.train(cfg, root / "store", root / "run", progress=False, device="cpu")
    return root / "run"


class Spy:
    """Wraps an encoder's `encode`, keeping every list of texts it was asked for."""

    def __init__(self, encoder):
        self.encoder, self.calls = encoder, []

    def encode(self, texts, batch_size=64):
        self.calls.append(list(texts))
        return self.encoder.encode(texts, batch_size)


def test_memo_rows_are_each_texts_own_encoding_and_only_new_texts_reach_the_tower(clip_json):
    encoder = load_text_encoder(str(clip_json), None, device="cpu")
    spy = Spy(encoder)
    memo = MemoEncoder(spy)
    texts = ["red", "a blue wall", "red", ""]
    first = memo.encode(texts)
    again = memo.encode(["", "green", "red", "green"])
    assert spy.calls == [["red"], ["a blue wall"], [""], ["green"]]  # each text once, on its own
    for got, asked in ((first, texts), (again, ["", "green", "red", "green"])):
        alone = [encoder.encode([t]) for t in asked]  # the same bits whatever the batch
        for field in ("tokens", "mask", "pooled"):
            assert torch.equal(getattr(got, field), torch.cat([getattr(a, field) for a in alone]))
        batched = encoder.encode(asked)  # the per-batch embedding: the same to float rounding
        torch.testing.assert_close(got.tokens, batched.tokens)
        torch.testing.assert_close(got.pooled, batched.pooled)


def test_memo_drops_its_least_recently_used_rows_past_its_budget(clip_json):
    encoder = load_text_encoder(str(clip_json), None, device="cpu")
    spy = Spy(encoder)
    x = encoder.encode(["x"])
    one = sum(t[0].numel() * t[0].element_size() for t in (x.tokens, x.mask, x.pooled))  # one text's row
    memo = MemoEncoder(spy, max_bytes=2 * one)
    memo.encode(["a", "b", "c"])  # all three are needed by this batch: none is dropped yet
    assert list(memo.rows) == ["a", "b", "c"] and memo.bytes == 3 * one
    memo.encode(["c"])  # the next batch: the least recently used row goes
    assert list(memo.rows) == ["b", "c"] and memo.bytes == 2 * one
    out = memo.encode(["a"])  # dropped, so through the tower again; "b" (least recent) makes room
    assert spy.calls[-1] == ["a"] and list(memo.rows) == ["c", "a"]
    assert torch.equal(out.tokens, encoder.encode(["a"]).tokens)


@pytest.mark.parametrize("to_folder", [False, True])
def test_a_sampling_job_embeds_each_prompt_once_and_makes_the_same_images(text_run, tmp_path, monkeypatch,
                                                                          to_folder):
    loaded = load_run(text_run)
    spy = Spy(loaded.text_encoder())
    loaded._text_encoder = spy
    job = dict(n=3, prompts=["red", "green"], guidance=2.0, steps=3, batch_size=2, output="tensor")
    out = {"out": tmp_path / "memo"} if to_folder else {}
    memoised = lp.sample(loaded, **job, **out)
    assert sorted(spy.calls) == [[""], ["green"], ["red"]]  # 3 batches, each text once
    spy.calls.clear()
    monkeypatch.setattr(generate, "memo_encoder", lambda encoder: None)  # every batch through the tower
    out = {"out": tmp_path / "plain"} if to_folder else {}
    plain = lp.sample(loaded, **job, **out)
    assert len(spy.calls) == 3
    assert (memoised - plain).abs().max() <= 1 / 255 and (memoised != plain).float().mean() < 0.01
