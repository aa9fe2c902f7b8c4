"""Conditioning: the run's spec decided once (and recorded), requests checked against it, stored rows drawn."""

from __future__ import annotations

import json

import pytest
from text_helpers import colour_folder, write_clip_config

from latentpatch.conditioning import ConditioningSpec, derive_spec, spec_from_run
from latentpatch.conditioning.requested import request_conditioning
from latentpatch.config import load_config
from latentpatch.errors import UserError

TEXT_RECORD = {"model": "m", "pretrained": None, "max_length": 8, "width": 4, "pooled_dim": 4}


def test_class_requests_give_labels_and_the_null_label():
    cond, uncond = request_conditioning(ConditioningSpec(num_classes=5), None, class_labels=[0, 4, 2])
    assert cond.class_labels.tolist() == [0, 4, 2] and uncond.class_labels.tolist() == [5, 5, 5]
    assert request_conditioning(ConditioningSpec(), None) == (None, None)


def test_requests_the_model_cannot_take_are_refused():
    plain, classes, text = ConditioningSpec(), ConditioningSpec(num_classes=3), ConditioningSpec(text_encoder=TEXT_RECORD)
    with pytest.raises(UserError, match="this model is not text-conditioned"):
        request_conditioning(plain, None, prompts=["a cat"])
    with pytest.raises(UserError, match="this model is not text-conditioned"):
        request_conditioning(classes, None, prompts=["a cat"])
    with pytest.raises(UserError, match=r"class 3 is out of range: this model has classes 0..2"):
        request_conditioning(classes, None, class_labels=[0, 3])
    with pytest.raises(UserError, match="class -1 is out of range"):
        request_conditioning(classes, None, class_labels=[-1])
    with pytest.raises(UserError, match="this model has no classes"):
        request_conditioning(plain, None, class_labels=[0])
    with pytest.raises(UserError, match="this model is text-conditioned; give --prompt"):
        request_conditioning(text, None)


def test_a_run_json_written_before_the_spec_existed_is_read_from_its_keys_and_the_model_config():
    cfg = load_config("tiny")
    old = {"num_classes": 0, "class_names": None, "text_encoder": TEXT_RECORD}  # copied from the store
    assert spec_from_run(old, cfg) == ConditioningSpec()  # the model has no text widths: it is not text-conditioned
    cfg.model.text_dim, cfg.model.pooled_text_dim = 4, 4
    assert spec_from_run(old, cfg) == ConditioningSpec(text_encoder=TEXT_RECORD, pooled=True)
    spec = ConditioningSpec(num_classes=2, class_names=("a", "b"))
    assert spec_from_run({"conditioning": spec.to_dict()}, cfg) == spec
    assert json.loads(json.dumps(spec.to_dict())) == spec.to_dict()


def test_text_model_none_on_a_store_with_text_trains_and_records_no_text(tmp_path):
    """Before the spec, run.json copied the store's text encoder: `sample` then demanded prompts and ignored them."""
    from latentpatch.data.store import LatentStore
    from latentpatch.encoding.encode import encode
    from latentpatch.sampling.generate import sample
    from latentpatch.training.trainer import train

    clip = write_clip_config(tmp_path / "tiny-clip.json")
    encode(colour_folder(tmp_path / "images", n=6, size=16), tmp_path / "store", "pixel", 16, text_encoder=str(clip),
           workers=0)
    cfg = load_config("tiny", ["text.model=none", "train.max_steps=2", "train.ckpt_every=2"])
    cfg_out, spec, text = derive_spec(cfg, LatentStore(tmp_path / "store"))
    assert spec == ConditioningSpec() and text is None and cfg_out.model.text_dim == 0
    train(cfg, tmp_path / "store", tmp_path / "run", progress=False, device="cpu")
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["conditioning"]["text_encoder"] is None
    images = sample(tmp_path / "run", n=2, steps=2, output="tensor")  # no prompt needed, none refused silently
    assert images.shape == (2, 3, 16, 16)
    with pytest.raises(UserError, match="not text-conditioned"):
        sample(tmp_path / "run", n=1, steps=2, prompts=["red"])
