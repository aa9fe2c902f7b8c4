"""Conditioning, one home: the tensors a denoiser takes, the run's spec (decided once from the config and
the store, recorded in run.json), and the three sources of conditioning — stored rows (training, held-out
sets, previews), requests (prompts, class labels) and the null condition guidance contrasts them with."""

from latentpatch.conditioning.spec import NO_TEXT, ConditioningSpec, TextSource, derive_spec, spec_from_run
from latentpatch.conditioning.tensors import Conditioning, cat_conditioning

__all__ = ["NO_TEXT", "Conditioning", "ConditioningSpec", "TextSource", "cat_conditioning", "derive_spec",
           "spec_from_run"]
