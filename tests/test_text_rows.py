"""The store's text rows: each distinct caption goes through the text tower once, and the rows are the same
bits as embedding every image's caption on its own row (the old per-image path)."""

import pytest
import torch
from text_helpers import write_clip_config

from latentpatch.data.manifest import Item
from latentpatch.text.cache import HASH_KEY, TEXT_KEYS, with_text_rows
from latentpatch.text.identity import caption_hash
from latentpatch.text.loader import load_text_encoder

CAPTIONS = [["a red wall", "a blue door", "a red wall", None, "a red wall"], ["a blue door", "green grass", None]]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return load_text_encoder(str(write_clip_config(tmp_path_factory.mktemp("clip") / "tiny.json")), None,
                             device="cpu")


def per_image_rows(encoder, captions, dtype):
    """What the store held before: every caption embedded on its own row, in one encode call per batch."""
    emb = encoder.encode(["" if c is None else c for c in captions])
    return {"text_tokens": emb.tokens.to(dtype), "text_mask": emb.mask, "text_pooled": emb.pooled.to(dtype),
            HASH_KEY: torch.tensor([caption_hash(c) for c in captions], dtype=torch.int64)}


def items(captions):
    return [Item(file=f"{i}.png", sha256=f"{i:064x}", caption=c, flip=False, shard=0, row=0)
            for i, c in enumerate(captions)]


@pytest.fixture
def one_at_a_time(encoder, monkeypatch):
    """The tower run one caption per call, so a caption's bits cannot depend on its batch; the captions it saw.

    On this CPU a caption embedded in a batch of 1 or 2 differs from the same caption in a larger batch by up to
    2e-6 (the matmul kernels follow the batch shape): the old per-image path already gave one caption different
    bits in different encode batches. With that rounding taken out, the rows must be the same bits."""
    seen = []
    encode = type(encoder).encode
    monkeypatch.setattr(type(encoder), "encode",
                        lambda self, texts, **kw: (seen.extend(texts), encode(self, texts, batch_size=1))[1])
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_captions_are_embedded_once_each_and_rows_match_the_per_image_path(encoder, one_at_a_time, dtype):
    rows = with_text_rows(None, encoder, dtype)
    got = [rows(items(batch)) for batch in CAPTIONS]
    assert one_at_a_time == ["a red wall", "a blue door", "", "green grass"]  # 4 distinct captions, 8 images
    for batch, out in zip(CAPTIONS, got):
        old = per_image_rows(encoder, batch, dtype)
        assert set(out) == {*TEXT_KEYS, HASH_KEY}
        for key in out:
            assert out[key].dtype == old[key].dtype and torch.equal(out[key], old[key]), key


def test_with_batched_encoding_rows_differ_from_the_per_image_path_only_by_batch_shape_rounding(encoder):
    rows = with_text_rows(None, encoder, torch.float32)
    for batch in CAPTIONS:
        out, old = rows(items(batch)), per_image_rows(encoder, batch, torch.float32)
        assert torch.equal(out["text_mask"], old["text_mask"]) and torch.equal(out[HASH_KEY], old[HASH_KEY])
        assert (out["text_tokens"] - old["text_tokens"]).abs().max() <= 1e-5


def test_rows_of_forgotten_captions_are_embedded_again_and_still_match(encoder, one_at_a_time):
    rows = with_text_rows(None, encoder, torch.float32, keep=1)
    first = rows(items(["a red wall", "a blue door"]))
    rows(items(["green grass"]))  # the two above are forgotten
    again = rows(items(["a red wall", "a blue door"]))
    assert all(torch.equal(first[k], again[k]) for k in first)
