"""The text encoders of SD3 and FLUX pipelines as latentpatch text encoders: their own encode_prompt's features,
recorded in a store's manifest and cached once per distinct caption like any other encoder."""

from __future__ import annotations

import warnings

import pytest
import torch
from flow_helpers import CLIP_WIDTHS, T5_WIDTH, load_pipeline, make_flux_pipeline, make_sd3_pipeline
from text_helpers import colour_folder

import latentpatch as lp
from latentpatch.errors import Notice, UserError
from latentpatch.text.flow_encoder import FlowPipelineTextEncoder
from latentpatch.text.identity import same_text_encoder
from latentpatch.text.loader import load_text_encoder, load_text_encoder_from_record

LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 3)  # past T5's 16 tokens, within CLIP's 77
TEXTS = ["red brick wall", "", LONG]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-text")
    return {"sd3": make_sd3_pipeline(root / "sd3"), "flux": make_flux_pipeline(root / "flux")}


@pytest.fixture(scope="module")
def encoders(folders):
    return {kind: load_text_encoder(f"transformers:{folder}", max_length=16, device="cpu")
            for kind, folder in folders.items()}


@pytest.fixture(scope="module")
def pipes(folders):
    return {kind: load_pipeline(folder) for kind, folder in folders.items()}


def _pipeline_embeddings(pipe, kind, texts, max_length):
    with torch.no_grad():
        if kind == "sd3":
            tokens, _, pooled, _ = pipe.encode_prompt(texts, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=max_length)
        else:
            tokens, pooled, _ = pipe.encode_prompt(texts, None, max_sequence_length=max_length)
    return tokens, pooled


@pytest.mark.parametrize("kind,length,pooled", [("sd3", 77 + 16, sum(CLIP_WIDTHS)), ("flux", 16, CLIP_WIDTHS[0])])
def test_embeddings_are_the_pipelines_encode_prompt(encoders, pipes, kind, length, pooled):
    encoder = encoders[kind]
    assert isinstance(encoder, FlowPipelineTextEncoder)
    record = encoder.record
    assert (record["width"], record["pooled_dim"], record["sequence_length"]) == (T5_WIDTH, pooled, length)
    assert (record["layer"], record["padding"], record["max_length"]) == ("last", "pipeline", 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        emb = encoder.encode(TEXTS)
    tokens, pooled_want = _pipeline_embeddings(pipes[kind], kind, TEXTS, 16)
    assert torch.equal(emb.tokens, tokens) and torch.equal(emb.pooled, pooled_want)
    assert emb.mask.shape == (3, length) and bool(emb.mask.all())  # every position attended, as the pipeline does


def test_the_empty_caption_is_sd3s_negative_prompt(encoders, pipes):
    """Guidance dropout's empty caption is what StableDiffusion3Pipeline puts beside a prompt by default."""
    encoder = encoders["sd3"]
    with torch.no_grad():
        _, neg, _, neg_pooled = pipes["sd3"].encode_prompt(
            "red brick wall", None, None, do_classifier_free_guidance=True, max_sequence_length=16)
    null = encoder.encode([""])
    assert torch.equal(null.tokens, neg) and torch.equal(null.pooled, neg_pooled)


def test_a_long_caption_is_cut_with_one_notice_per_tower_it_overflows(encoders, pipes, caplog):
    """FLUX cuts T5 at max_sequence_length and CLIP at 77: one line for each tower a caption is too long for."""
    encoder, pipe = encoders["flux"], pipes["flux"]
    n_t5 = len(pipe.tokenizer_2(LONG).input_ids)
    with pytest.warns(Notice) as caught:
        encoder.encode([LONG, "green grass"])
    assert [str(w.message) for w in caught] == [
        f"text {LONG[:57] + '...'!r} is {n_t5} tokens, longer than T5's 16: its last {n_t5 - 16} tokens were dropped"]
    assert "truncated" not in caplog.text  # the pipeline's own warning is not said as well
    longer = " ".join(["red brick wall"] * 30)  # 92 CLIP tokens
    with pytest.warns(Notice) as caught:
        encoder.encode([longer])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "longer than CLIP's 77: its last 15 tokens were dropped" in messages[0]
    assert "longer than T5's 16" in messages[1]


def test_the_defaults_are_each_pipelines_and_other_features_are_refused(folders):
    sd3 = load_text_encoder(f"transformers:{folders['sd3']}", device="cpu")
    flux = load_text_encoder(f"transformers:{folders['flux']}", device="cpu")
    assert (sd3.record["max_length"], flux.record["max_length"]) == (256, 512)  # the pipelines' max_sequence_length
    with pytest.raises(UserError, match="text.padding=pipeline"):
        load_text_encoder(f"transformers:{folders['sd3']}", device="cpu", padding="masked")
    with pytest.raises(UserError, match="not one"):
        load_text_encoder("ViT-B-32", device="cpu", padding="pipeline")


def test_encode_records_the_encoder_and_caches_each_caption(folders, tmp_path):
    """`latentpatch encode --text-encoder transformers:SD3_FOLDER`: the manifest records the pipeline's encoders,
    each row holds its caption's embedding, the empty caption's is beside the manifest, and the record loads the
    same encoder back."""
    from latentpatch.data.store import LatentStore
    from latentpatch.text.cache import read_null

    images = colour_folder(tmp_path / "images", n=6, size=16)
    spec = f"transformers:{folders['sd3']}"
    lp.encode(images, tmp_path / "store", vae=str(folders["sd3"]), resolution=16, text_encoder=spec, dtype="float32")
    store = LatentStore(tmp_path / "store")
    record = store.manifest.text_encoder
    assert record["padding"] == "pipeline" and record["pipeline"] == "StableDiffusion3Pipeline"
    fresh = load_text_encoder_from_record(record, device="cpu")
    assert same_text_encoder(record, fresh.record)
    rows = store.load()
    emb = fresh.encode(store.captions)
    torch.testing.assert_close(rows["text_tokens"], emb.tokens, rtol=0, atol=1e-5)
    torch.testing.assert_close(rows["text_pooled"], emb.pooled, rtol=0, atol=1e-5)
    assert rows["text_tokens"].shape[1] == 77 + 256 and bool(rows["text_mask"].all())
    assert torch.equal(read_null(store.path).tokens, fresh.encode([""]).tokens)
