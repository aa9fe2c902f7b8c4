"""Text conditioning: a tiny model learns colour from the prompt; caches, dropout and bad input behave.

The text encoder is a real open_clip CLIP built from a tiny model config (2 text layers of width 32) with
random weights, and open_clip's bundled BPE tokenizer: everything runs offline.
"""

import json
import warnings

import pytest
import torch
from text_helpers import colour_folder, write_clip_config
from typer.testing import CliRunner

import latentpatch as lp
from latentpatch.conditioning import ConditioningSpec, derive_spec
from latentpatch.conditioning.requested import request_conditioning
from latentpatch.conditioning.stored import condition_rows, draw_rows
from latentpatch.config import load_config
from latentpatch.data.store import LatentStore
from latentpatch.text.cache import NULL_FILE, read_null
from latentpatch.errors import UserError
from latentpatch.seeding import make_generator
from latentpatch.text.identity import caption_hash
from latentpatch.text.loader import load_text_encoder, load_text_encoder_from_record


@pytest.fixture(scope="module")
def clip_json(tmp_path_factory):
    return write_clip_config(tmp_path_factory.mktemp("clip") / "tiny-clip.json")


@pytest.fixture(scope="module")
def encoder(clip_json):
    return load_text_encoder(str(clip_json), None, device="cpu")


@pytest.fixture(scope="module")
def store(tmp_path_factory, clip_json):
    root = tmp_path_factory.mktemp("colours")
    lp.encode(colour_folder(root / "images"), root / "store", "pixel", 8, workers=0, dtype="float32",
              text_encoder=str(clip_json))
    return LatentStore(root / "store")


@pytest.fixture(scope="module")
def colour_run(store, tmp_path_factory):
    cfg = load_config("tiny", ["train.max_steps=200", "train.batch_size=32", "train.ckpt_every=200",
                               "optim.warmup_steps=20", "model.attention=sdpa", "train.sample_every=200"])
    run = tmp_path_factory.mktemp("run") / "run"
    lp.train(cfg, store, run, progress=False, device="cpu")
    return run


def test_generated_colour_follows_the_prompt(colour_run):
    images = lp.sample(colour_run, n=8, prompts=["red", "green", "blue"], guidance=2.0, steps=8,
                       output="tensor", device="cpu")
    dominant = images.mean(dim=(2, 3)).argmax(dim=1)
    wanted = torch.tensor([0] * 8 + [1] * 8 + [2] * 8)
    assert (dominant == wanted).float().mean() >= 0.9  # chance is 1/3


def test_run_records_the_encoder_and_the_text_widths(colour_run, store):
    info = json.loads((colour_run / "run.json").read_text())
    assert info["conditioning"]["text_encoder"] == store.manifest.text_encoder
    cfg = load_config(colour_run / "config.yaml")
    assert (cfg.model.text_dim, cfg.model.pooled_text_dim) == (32, 32)
    assert cfg.text.model == store.manifest.text_encoder["model"]  # adopted from the store's cache
    assert (colour_run / "samples" / "step-00000200.png").read_bytes()[:4] == b"\x89PNG"  # grids of its captions


def test_sample_cli_takes_a_prompt_and_guidance(colour_run, tmp_path):
    from latentpatch.cli.app import app

    result = CliRunner().invoke(app, ["sample", str(colour_run), "--prompt", "green", "--n", "2", "--guidance", "2",
                                      "--steps", "4", "--out", str(tmp_path / "out"), "--device", "cpu",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "out" / "images.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["green", "green"] and rows[0]["guidance"] == 2.0


def test_tokens_and_pooled_are_open_clips_text_tower(encoder):
    ids = encoder.tokenize(["a red brick wall", ""])
    emb = encoder.encode(["a red brick wall", ""])
    with torch.no_grad():
        assert torch.equal(emb.pooled, encoder.model.encode_text(ids))
    # Real tokens: start, 4 words, end of text (6); the empty caption keeps start and end.
    assert emb.mask.sum(1).tolist() == [6, 2]
    assert emb.mask[0, :6].all() and not emb.mask[0, 6:].any()
    assert emb.tokens.shape == (2, 77, 32)


def test_cached_text_embeddings_equal_recomputed_ones(store):
    cached = store.load()
    fresh = load_text_encoder_from_record(store.manifest.text_encoder, device="cpu")  # a new instance, same weights
    emb = fresh.encode(store.captions)
    assert torch.equal(cached["text_mask"], emb.mask)
    # Batches of different make-up differ in the last float bits only.
    torch.testing.assert_close(cached["text_tokens"], emb.tokens, rtol=0, atol=1e-5)
    torch.testing.assert_close(cached["text_pooled"], emb.pooled, rtol=0, atol=1e-5)
    assert cached["text_caption_hash"].tolist() == [caption_hash(c) for c in store.captions]
    null, empty = read_null(store.path), fresh.encode([""])
    torch.testing.assert_close(null.tokens, empty.tokens, rtol=0, atol=1e-5)
    assert store.manifest.text_encoder["width"] == 32 and store.manifest.text_encoder["max_length"] == 77


def test_training_uses_the_cache_and_computes_the_same_without_it(store, clip_json):
    cfg = load_config("tiny", [f"text.model={clip_json}"])
    cfg, spec, text = derive_spec(cfg, store)
    assert text.cached and text.encoder is None  # the encoder is not even loaded
    from_cache = condition_rows(spec, store, store.load(), text)
    text.cached = False  # as for a store encoded without --text-encoder: embed every caption once
    text.encoder = load_text_encoder(str(clip_json), None, device="cpu")
    computed = condition_rows(spec, store, store.load(), text)
    assert from_cache["text_tokens"].shape == (24, 3, 32)  # cut to the longest caption: start, word, end
    for key, value in from_cache.items():
        torch.testing.assert_close(value, computed[key], rtol=0, atol=1e-5)


def test_caption_dropout_rate_and_it_is_drawn_from_the_step_generator():
    spec = ConditioningSpec(text_encoder={"width": 4, "pooled_dim": 3}, pooled=True)
    n = 20000
    tensors = {
        "text_tokens": torch.ones(n, 5, 4), "text_mask": torch.ones(n, 5, dtype=torch.bool),
        "text_pooled": torch.ones(n, 3), "null_text_tokens": torch.zeros(1, 5, 4),
        "null_text_mask": torch.tensor([[True, True, False, False, False]]), "null_text_pooled": torch.zeros(1, 3),
    }
    indices = torch.arange(n)
    cond = draw_rows(spec, tensors, indices, make_generator("cpu", 0, 7, 0, "batch"), 0.0, 0.1)
    dropped = (cond.text_tokens == 0).all(dim=(1, 2))
    assert abs(dropped.float().mean().item() - 0.1) < 0.01  # 4.7 standard deviations
    assert torch.equal((cond.text_pooled == 0).all(1), dropped) and torch.equal(~cond.text_mask[:, 2], dropped)
    again = draw_rows(spec, tensors, indices, make_generator("cpu", 0, 7, 0, "batch"), 0.0, 0.1)
    assert torch.equal(again.text_tokens, cond.text_tokens)  # a resumed step drops the same captions
    assert (draw_rows(spec, tensors, indices, make_generator("cpu", 0, 7, 0, "batch"), 0.0, 0.0).text_tokens == 1).all()


def test_a_prompt_longer_than_the_context_is_truncated_with_a_warning(encoder):
    prompt = " ".join(["red"] * 80)  # 80 words + start + end = 82 tokens
    with pytest.warns(UserWarning, match="82 tokens.*5 tokens were dropped"):
        emb = encoder.encode([prompt])
    assert emb.mask.all()
    with pytest.warns(UserWarning, match="5 tokens were dropped"):
        assert encoder.tokenize([prompt])[0, 76].item() == encoder.tokenizer.eot_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode(["red"])  # a short prompt warns nothing


def test_unknown_open_clip_model_names_how_to_list_them():
    with pytest.raises(UserError, match=r"unknown open_clip model 'ViT-B-33'.*ViT-B-32.*open_clip.list_models"):
        load_text_encoder("ViT-B-33")
    with pytest.raises(UserError, match="neither a known tag"):
        load_text_encoder("RN50", "no-such-tag")


def test_text_conditioning_refuses_a_store_with_uncaptioned_items(tmp_path, clip_json):
    images = colour_folder(tmp_path / "images", n=3, captions=False)
    (images / "000.txt").write_text("red")
    lp.encode(images, tmp_path / "store", "pixel", 8, workers=0, text_encoder=str(clip_json))
    cfg = load_config("tiny", ["train.max_steps=1"])
    with pytest.raises(UserError, match=r"2 of 3 items .* have no caption \(001.png, 002.png\)"):
        lp.train(cfg, tmp_path / "store", tmp_path / "run", progress=False, device="cpu")


def test_a_store_keeps_its_text_encoder(tmp_path, clip_json):
    other = write_clip_config(tmp_path / "other-clip.json", layers=1)
    images = colour_folder(tmp_path / "images", n=3)
    lp.encode(images, tmp_path / "store", "pixel", 8, workers=0, text_encoder=str(clip_json))
    colour_folder(tmp_path / "images", n=6)  # three new images
    with pytest.raises(UserError, match="holds text embeddings from tiny-clip.json"):
        lp.encode(images, tmp_path / "store", "pixel", 8, workers=0, text_encoder=str(other))
    lp.encode(images, tmp_path / "store", "pixel", 8, workers=0)  # a rerun keeps the store's encoder
    loaded = LatentStore(tmp_path / "store").load()
    assert loaded["text_tokens"].shape[0] == 6 and (tmp_path / "store" / NULL_FILE).is_file()
    lp.encode(images, tmp_path / "plain", "pixel", 8, workers=0)
    with pytest.raises(UserError, match="encoded without text embeddings"):
        lp.encode(images, tmp_path / "plain", "pixel", 8, workers=0, text_encoder=str(clip_json))


def test_guidance_and_unconditional_use_the_empty_caption(colour_run):
    from latentpatch.runs import load_run

    run = load_run(colour_run)
    encoder = run.text_encoder()
    cond, uncond = request_conditioning(run.spec, encoder, prompts=["red", "a blue thing"])
    empty, _ = request_conditioning(run.spec, encoder, prompts=[""])
    assert cond.text_tokens.shape == uncond.text_tokens.shape == (2, 5, 32)  # the longer prompt's 5 tokens
    assert uncond.text_mask.sum(1).tolist() == [2, 2]
    torch.testing.assert_close(uncond.text_pooled[0], empty.text_pooled[0])
    assert run.text_encoder() is encoder  # loaded once, kept on the run for the next batch
    with pytest.raises(UserError, match="text-conditioned; give --prompt"):
        request_conditioning(run.spec, encoder)


def test_a_resumed_text_run_equals_an_uninterrupted_one(store, tmp_path):
    from safetensors.torch import load_file

    over = ["train.batch_size=8", "train.ckpt_every=2", "optim.warmup_steps=2", "model.attention=sdpa"]
    lp.train(load_config("tiny", over + ["train.max_steps=4"]), store, tmp_path / "whole", progress=False,
             device="cpu")
    lp.train(load_config("tiny", over + ["train.max_steps=2"]), store, tmp_path / "split", progress=False,
             device="cpu")
    lp.train(None, store, tmp_path / "split", resume=True, max_steps=4, progress=False, device="cpu")
    a = load_file(tmp_path / "whole" / "checkpoints" / "step-00000004" / "model.safetensors")
    b = load_file(tmp_path / "split" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same batches, same caption dropout


def test_encode_cli_caches_text_embeddings(tmp_path, clip_json):
    from latentpatch.cli.app import app

    images = colour_folder(tmp_path / "images", n=3, captions=False)
    (images / "000.txt").write_text("red")
    result = CliRunner().invoke(app, ["encode", str(images), "--vae", "pixel", "--resolution", "8", "--out",
                                      str(tmp_path / "store"), "--workers", "0", "--no-progress",
                                      "--text-encoder", str(clip_json)])
    assert result.exit_code == 0, result.output
    assert "2 stored images have no caption" in result.output
    store = LatentStore(tmp_path / "store")
    assert store.manifest.text_encoder["config_sha256"] and store.load()["text_pooled"].shape == (3, 32)
    bad = CliRunner().invoke(app, ["encode", str(images), "--vae", "pixel", "--resolution", "8", "--out",
                                   str(tmp_path / "other"), "--workers", "0", "--text-encoder", "ViT-B-33:openai"])
    assert bad.exit_code != 0 and "unknown open_clip model 'ViT-B-33'" in str(bad.exception)


def test_heldout_set_of_a_penultimate_layer_run_embeds_captions_again_instead_of_the_last_layer_cache(store, clip_json):
    # The store caches last-layer features; a run trained on penultimate-layer ones must be scored with those.
    from latentpatch.metrics.denoising import scored_rows, store_heldout_set

    penultimate = load_text_encoder(str(clip_json), None, device="cpu", layer="penultimate")
    spec = ConditioningSpec(text_encoder=penultimate.record, pooled=True)
    heldout = store_heldout_set(store, spec, num_sigmas=1, limit=4)
    rows = scored_rows(store, torch.arange(len(store)), 4, seed=0).tolist()  # the 4 items the set scores
    emb = penultimate.encode([store.captions[i] for i in rows])
    length = heldout.cond.text_tokens.shape[1]
    torch.testing.assert_close(heldout.cond.text_tokens, emb.tokens[:, :length], rtol=0, atol=1e-5)
    assert not torch.allclose(store.load()["text_tokens"][rows, :length], emb.tokens[:, :length], atol=1e-3)
