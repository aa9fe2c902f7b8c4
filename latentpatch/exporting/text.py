"""A run's text encoder in an export: a transformers CLIP text model and CLIPTokenizer, the features recorded.

A pipeline base's own encoder (`transformers:PIPELINE`) is a CLIPTextModel already and is saved as it is. An
open_clip tower (latentpatch/text/open_clip_encoder.py) is converted to CLIPTextModelWithProjection, the class
its architecture is (token and position embeddings, pre-LN blocks with one fused attention projection, causal
mask, final layer norm, pooling at the end-of-text token, a projection without bias), and its BPE vocabulary to
CLIPTokenizer, so the folder needs transformers, not open_clip. The penultimate-layer features (Stable Diffusion
2.x's) become a tower without its last block read at its last layer, as SD 2.x's text_encoder/ was converted.
The conversion is checked on probe prompts against the run's encoder before anything is written.

What can differ: CLIPTokenizer cleans text without ftfy's repairs and HTML unescaping, which open_clip's
tokenizer applies, and reads "<|endoftext|>" written in a prompt as the token itself, so prompts with mojibake,
HTML entities (&amp;) or special-token text may tokenize differently.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentpatch.errors import UserError

PROBES = ["", "a red brick wall", "A photo of a cat, sitting on a mat!", "blue", "two  spaces and UPPER case 42"]
TOLERANCE = 1e-4  # of the features' largest magnitude: float32 rounding of the same math in another order


@dataclass
class ExportedText:
    text_encoder: Any  # a transformers CLIPTextModel / CLIPTextModelWithProjection
    tokenizer: Any  # a transformers CLIPTokenizer
    layer: str  # the pipeline's text_layer
    padding: str  # "masked" | "eot" | "zero"
    max_length: int


def _tower(clip: Any) -> Any:
    """open_clip's text transformer: CLIP keeps it on the model, CustomTextCLIP in `.text`."""
    return getattr(clip, "text", None) or clip


def _activation(block: Any) -> str:
    from open_clip.transformer import QuickGELU

    act = block.mlp[1]
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, torch.nn.GELU) and act.approximate == "none":
        return "gelu"
    raise UserError(f"the open_clip text tower's MLP uses {type(act).__name__}, which CLIPTextModel does not have")


def _check_convertible(tower: Any, tokenizer: Any) -> None:
    """UserError naming what makes an open_clip text tower other than CLIP's own architecture."""
    from open_clip.tokenizer import SimpleTokenizer

    pool = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", None)
    problems = []
    if getattr(tower, "cls_emb", None) is not None:
        problems.append("a CLS token")
    if pool not in ("argmax", "eos"):
        problems.append(f"pooling {pool!r}")
    if getattr(tower, "attn_mask", None) is None:
        problems.append("no causal mask")
    for block in tower.transformer.resblocks:
        if not isinstance(block.attn, torch.nn.MultiheadAttention) or block.attn.in_proj_weight is None:
            problems.append("a custom attention")
        if not isinstance(block.ls_1, torch.nn.Identity) or not isinstance(block.ls_2, torch.nn.Identity):
            problems.append("layer scale")
        if len(block.mlp) != 3:
            problems.append("a normalised MLP")
    proj = tower.text_projection
    if isinstance(proj, torch.nn.Linear) and proj.bias is not None:
        problems.append("a projection with bias")
    if not isinstance(tokenizer, SimpleTokenizer) or getattr(tokenizer.clean_fn, "__name__", "") != "_clean_lower":
        problems.append(f"the tokenizer {type(tokenizer).__name__} (CLIP's BPE with lower-case cleaning is served)")
    if problems:
        raise UserError(f"the run's open_clip text tower cannot be exported as a transformers CLIPTextModel: it has "
                        f"{', '.join(dict.fromkeys(problems))}")


def _layer_norm_eps(tower: Any) -> float:
    eps = {m.eps for m in tower.modules() if isinstance(m, torch.nn.LayerNorm)}
    if len(eps) != 1:
        raise UserError(f"the open_clip text tower's layer norms use several epsilons {sorted(eps)}; CLIPTextModel "
                        "has one")
    return eps.pop()


@torch.no_grad()
def clip_text_model(tower: Any, layers: int) -> Any:
    """CLIPTextModelWithProjection holding the first `layers` blocks of an open_clip text tower."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    blocks = tower.transformer.resblocks
    proj = tower.text_projection
    proj_weight = proj.weight if isinstance(proj, torch.nn.Linear) else proj.t()  # pooled @ P == Linear(P^T)
    vocab, width = tower.token_embedding.weight.shape
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=layers, num_attention_heads=blocks[0].attn.num_heads,
        max_position_embeddings=tower.positional_embedding.shape[0], hidden_act=_activation(blocks[0]),
        layer_norm_eps=_layer_norm_eps(tower), projection_dim=proj_weight.shape[0], bos_token_id=49406,
        eos_token_id=49407, pad_token_id=0, attention_dropout=0.0)
    model = CLIPTextModelWithProjection(config).eval()
    tm = model.text_model
    tm.embeddings.token_embedding.weight.copy_(tower.token_embedding.weight)
    tm.embeddings.position_embedding.weight.copy_(tower.positional_embedding)
    for layer, block in zip(tm.encoder.layers, blocks):
        attn = layer.self_attn
        for ours, w, b in zip((attn.q_proj, attn.k_proj, attn.v_proj), block.attn.in_proj_weight.chunk(3),
                              block.attn.in_proj_bias.chunk(3)):
            ours.weight.copy_(w)
            ours.bias.copy_(b)
        for ours, theirs in ((attn.out_proj, block.attn.out_proj), (layer.layer_norm1, block.ln_1),
                             (layer.layer_norm2, block.ln_2), (layer.mlp.fc1, block.mlp.c_fc),
                             (layer.mlp.fc2, block.mlp.c_proj)):
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
    tm.final_layer_norm.weight.copy_(tower.ln_final.weight)
    tm.final_layer_norm.bias.copy_(tower.ln_final.bias)
    model.text_projection.weight.copy_(proj_weight)
    return model


def clip_tokenizer(tokenizer: Any, context_length: int) -> Any:
    """CLIPTokenizer over open_clip's BPE vocabulary. It pads with end-of-text: open_clip pads with id 0, but a
    pad token "!" (id 0, as SD 2.x's tokenizer has it) would split every "!" of a prompt off as that token. The
    padding's ids matter only where they are attended, and there the features set them ("eot", "zero")."""
    from transformers import CLIPTokenizer

    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in tokenizer.encoder.items()}
    merges = sorted(tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in merges))
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                             pad_token="<|endoftext|>", model_max_length=context_length)


def _converted(encoder: Any) -> ExportedText:
    tower = _tower(encoder.model)
    _check_convertible(tower, encoder.tokenizer)
    layers = len(tower.transformer.resblocks) - (encoder.layer == "penultimate")
    return ExportedText(clip_text_model(tower, layers), clip_tokenizer(encoder.tokenizer, encoder.context_length),
                        "last", encoder.padding, encoder.max_length)


def check_same_features(encoder: Any, text: ExportedText) -> None:
    """UserError unless the exported tokenizer and model give the run's features on the probe prompts."""
    from latentpatch.exporting.shipped.pipeline_latentpatch import encode_text

    ours = encoder.encode(PROBES)
    with torch.no_grad():
        tokens, mask, pooled = encode_text(text.tokenizer, text.text_encoder.to(encoder.device), PROBES,
                                           text.max_length, text.layer, text.padding)
    if not torch.equal(ours.mask, mask.cpu()):
        raise UserError("the exported tokenizer does not split probe prompts as the run's tokenizer does")
    # masked padding never reaches the network (it is masked out of cross-attention): compare the real tokens
    real = ours.mask[..., None]
    for name, a, b in (("token features", ours.tokens * real, tokens.cpu() * real),
                       ("pooled embedding", ours.pooled, pooled.cpu())):
        scale = float(a.abs().max().clamp(min=1))
        if a.shape != b.shape or float((a - b).abs().max()) > TOLERANCE * scale:
            raise UserError(f"the exported text encoder does not reproduce the run's {name} on probe prompts; the "
                            "text encoder cannot be exported exactly")


def export_text(encoder: Any) -> ExportedText:
    """The run's text encoder (latentpatch.text TextEncoder) as transformers parts, checked on probe prompts."""
    if encoder.record.get("library") == "transformers":
        text = ExportedText(encoder.model, encoder.tokenizer, encoder.layer, encoder.padding, encoder.max_length)
    else:
        text = _converted(encoder)
    check_same_features(encoder, text)
    return text
