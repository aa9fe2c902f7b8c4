"""A frozen open-clip text encoder: captions and prompts -> token embeddings, mask and pooled embedding.

Token embeddings (the text transformer's output after ln_final, one per position) feed cross-attention;
the pooled embedding (what open_clip's `encode_text` returns) can feed adaLN. Only the text tower is kept.

    enc = load_text_encoder("ViT-B-32", "laion2b_s34b_b79k")
    emb = enc.encode(["a red brick wall", ""])      # tokens [2, 77, 512], mask [2, 77], pooled [2, 512]
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from latentpatch.errors import Notice, UserError
from latentpatch.text.identity import caption_hash, record_features

LIST_MODELS_HINT = "python -c \"import open_clip; print(open_clip.list_models())\""
LIST_TAGS_HINT = "python -c \"import open_clip; print(open_clip.list_pretrained())\""
RANDOM_WEIGHTS_SEED = 0  # pretrained=None: random weights, the same in every process (tests, smoke runs)


@dataclass
class TextEmbeddings:
    """Per-text outputs of the encoder, on the CPU."""

    tokens: Tensor  # [N, L, D] token embeddings (after ln_final)
    mask: Tensor  # [N, L] bool, True for real tokens up to and including the end-of-text token
    pooled: Tensor  # [N, P] the pooled (projected) embedding, as open_clip's encode_text


def trim_to_longest(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop trailing positions that are padding in every row: cross-attention masks them, so it only saves work."""
    length = int(mask.sum(dim=1).max()) if mask.numel() else 1
    return tokens[:, : max(length, 1)], mask[:, : max(length, 1)]


class TextEncoder:
    """The text tower of an open_clip model, frozen; see `load_text_encoder`."""

    def __init__(self, model: Any, tokenizer: Any, record: dict[str, Any], device: torch.device) -> None:
        self.model, self.tokenizer, self.record, self.device = model, tokenizer, record, device
        self.max_length: int = record["max_length"]
        self.width: int = record["width"]  # token embedding size (model.text_dim)
        self.pooled_dim: int = record["pooled_dim"]  # pooled embedding size (model.pooled_text_dim)
        self.layer, self.padding = record_features(record)

    def to(self, device: torch.device | str) -> TextEncoder:
        """Move the tower to `device` (in place); embeddings still come back on the CPU."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @property
    def context_length(self) -> int:
        return int(self.record["context_length"])

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids [N, context_length]; text past max_length tokens is cut, with a warning saying how much."""
        texts = list(texts)
        for text in texts:
            self._warn_if_cut(text, self._token_count(text))
        ids = self.tokenizer(texts, context_length=self.max_length)
        if ids.shape[1] < self.context_length:  # pad to the tower's length; padding never changes real tokens
            ids = torch.nn.functional.pad(ids, (0, self.context_length - ids.shape[1]))
        return ids

    def _token_count(self, text: str) -> int:
        encode = getattr(self.tokenizer, "encode", None)
        if encode is not None and hasattr(self.tokenizer, "sot_token_id"):  # open_clip's SimpleTokenizer
            return len(encode(text)) + 2  # + start and end of text
        ids = self.tokenizer([text], context_length=max(4 * self.max_length, 512))
        return int(self._real(ids).sum())

    def _warn_if_cut(self, text: str, n: int, limit: int | None = None, tower: str = "the text encoder") -> None:
        """Warn, saying how much, when `text` (n tokens) is longer than max_length (or `limit`, of the named
        `tower` of several) and so loses its end."""
        limit = self.max_length if limit is None else limit
        if n > limit:
            short = text if len(text) <= 60 else text[:57] + "..."
            # A Notice, attributed here: the CLI says it once per text, as one line without a source location.
            warnings.warn(f"text {short!r} is {n} tokens, longer than {tower}'s {limit}: its "
                          f"last {n - limit} tokens were dropped", Notice, stacklevel=1)

    def _end_of_text(self) -> int | None:
        """The tokenizer's end-of-text id (None: a tokenizer without one)."""
        return getattr(self.tokenizer, "eot_token_id", None)

    def _real(self, ids: Tensor) -> Tensor:
        return _real_tokens(ids, self._end_of_text())

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> TextEmbeddings:
        """Embeddings of `texts` in float32 on the CPU, in batches of `batch_size`."""
        texts = list(texts)
        parts = []
        for start in range(0, len(texts), batch_size):
            ids = self.tokenize(texts[start : start + batch_size])
            real = self._real(ids)
            ids = pad_ids(ids, real, self.padding, self._end_of_text())
            tokens, pooled = self._forward(ids.to(self.device))
            mask = real if self.padding == "masked" else torch.ones_like(real)
            parts.append((tokens[:, : self.max_length].float().cpu(), mask[:, : self.max_length],
                          pooled.float().cpu()))
        if not parts:
            return TextEmbeddings(torch.empty(0, self.max_length, self.width), torch.empty(0, self.max_length,
                                  dtype=torch.bool), torch.empty(0, self.pooled_dim))
        return TextEmbeddings(*(torch.cat(p) for p in zip(*parts)))

    def _forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        return _text_forward(self.model, ids, self.layer)

    def item_tensors(self, captions: Sequence[str | None], dtype: torch.dtype) -> dict[str, Tensor]:
        """Store rows for these captions (none -> the empty caption), with each caption's hash. The store's
        cache (text.cache.with_text_rows) passes each distinct caption once."""
        emb = self.encode(["" if c is None else c for c in captions])
        return {
            "text_tokens": emb.tokens.to(dtype), "text_mask": emb.mask, "text_pooled": emb.pooled.to(dtype),
            "text_caption_hash": torch.tensor([caption_hash(c) for c in captions], dtype=torch.int64),
        }


def pad_ids(ids: Tensor, real: Tensor, padding: str, eot: int | None) -> Tensor:
    """The ids with every position after the text (`real` False) set as `padding` says: "eot" the end-of-text
    id (CLIPTokenizer's padding, Stable Diffusion 1.x), "zero" id 0 (open_clip's, SD 2.x); "masked" keeps them."""
    if padding == "eot":
        if eot is None:
            raise UserError("text.padding=eot needs a tokenizer with an end-of-text token")
        return torch.where(real.to(ids.device), ids, torch.full_like(ids, eot))
    if padding == "zero":
        return torch.where(real.to(ids.device), ids, torch.zeros_like(ids))
    return ids


def _real_tokens(ids: Tensor, eot: int | None) -> Tensor:
    """True up to and including the first end-of-text token `eot` (or every non-zero id without one)."""
    if eot is None:
        return ids != 0
    is_eot = ids == eot
    first = torch.where(is_eot.any(1), is_eot.int().argmax(1), torch.full_like(ids[:, 0], ids.shape[1] - 1))
    return torch.arange(ids.shape[1])[None] <= first[:, None].cpu()


def _text_forward(model: Any, ids: Tensor, layer: str = "last") -> tuple[Tensor, Tensor]:
    """(tokens [N, L, D], pooled [N, P]): open_clip's CLIP.encode_text step by step, keeping the tokens.

    layer "penultimate" stops one block early and then applies ln_final, as Stable Diffusion 2.x's
    FrozenOpenCLIPEmbedder(layer="penultimate") does.
    """
    from open_clip.transformer import TextTransformer, text_global_pool

    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):  # CustomTextCLIP: the tower returns both when asked
        if layer == "last":
            text.output_tokens = True
            pooled, tokens = text(ids)
            return tokens, pooled
        if text.cls_emb is not None:
            raise UserError("text.layer=penultimate is not available for open_clip towers with a CLS token (CoCa)")
        x, attn_mask = text._embeds(ids)
        tower, ln_final, pool_type, eos_id, proj = (text.transformer, text.ln_final, text.pool_type,
                                                    getattr(text, "eos_id", None), text.text_projection)
    else:
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(ids).to(cast_dtype)
        x = x + model.positional_embedding.to(cast_dtype)
        attn_mask, tower, ln_final, pool_type, eos_id, proj = (model.attn_mask, model.transformer, model.ln_final,
                                                               model.text_pool_type, getattr(model, "text_eos_id",
                                                                                             None),
                                                               model.text_projection)
    x = tower(x, attn_mask=attn_mask) if layer == "last" else _all_blocks_but_last(tower, x, attn_mask)
    tokens = ln_final(x)
    pooled = text_global_pool(tokens, ids, pool_type, eos_token_id=eos_id)
    if proj is not None:
        pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
    return tokens, pooled


def _all_blocks_but_last(tower: Any, x: Tensor, attn_mask: Tensor | None) -> Tensor:
    """open_clip Transformer.forward over resblocks[:-1]."""
    if not tower.batch_first:
        x = x.transpose(0, 1).contiguous()
    for block in tower.resblocks[:-1]:
        x = block(x, attn_mask=attn_mask)
    return x if tower.batch_first else x.transpose(0, 1)


def _register_config_file(model: str) -> tuple[str, str | None]:
    """A `.json` open_clip model config file is registered under its file name: (name, sha256 of the file)."""
    import open_clip

    if not model.endswith(".json"):
        return model, None
    path = Path(model)
    if not path.is_file():
        raise UserError(f"text encoder config file {path} does not exist")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    open_clip.add_model_config(path)
    return path.stem, digest


def _check_model_name(name: str) -> None:
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")) or name.replace("/", "-") in open_clip.list_models():
        return
    close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
    hint = f" Close names: {', '.join(close)}." if close else ""
    raise UserError(
        f"unknown open_clip model {name!r} (text.model / --text-encoder).{hint} See every valid name with: "
        f"{LIST_MODELS_HINT}"
    )


def _pretrained_identity(name: str, pretrained: str | None) -> dict[str, Any]:
    """How the weights are named in the record: a tag, or an absolute file path with its sha256."""
    import open_clip

    if pretrained is None:
        return {"pretrained": None, "weights_sha256": None}
    if name.startswith(("hf-hub:", "local-dir:")):
        return {"pretrained": None, "weights_sha256": None}  # the weights come with the name
    if pretrained in open_clip.list_pretrained_tags_by_model(name.replace("/", "-")):
        return {"pretrained": pretrained, "weights_sha256": None}
    path = Path(pretrained)
    if path.is_file():
        from latentpatch.io import sha256_file

        return {"pretrained": str(path.resolve()), "weights_sha256": sha256_file(path)}
    tags = open_clip.list_pretrained_tags_by_model(name.replace("/", "-"))
    raise UserError(
        f"pretrained weights {pretrained!r} for open_clip model {name!r} are neither a known tag "
        f"({', '.join(tags) or 'none'}) nor a checkpoint file; see all pairs with: {LIST_TAGS_HINT}"
    )


def load_open_clip_encoder(
    model: str, pretrained: str | None, *, max_length: int | None, device: torch.device, layer: str, padding: str,
) -> TextEncoder:
    """An open_clip model's frozen text tower (see `latentpatch.text.loader.load_text_encoder`)."""
    import open_clip

    name, config_sha = _register_config_file(model)
    _check_model_name(name)
    identity = _pretrained_identity(name, pretrained)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)  # random weights (pretrained None) are a function of the name
            level = logging.getLogger().level
            if pretrained is None:  # open_clip warns about random weights on the root logger; they are asked for
                logging.getLogger().setLevel(logging.ERROR)
            try:
                clip = open_clip.create_model(name, pretrained=pretrained, device="cpu")
            finally:
                logging.getLogger().setLevel(level)
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        raise UserError(f"could not load open_clip model {name!r} (pretrained={pretrained!r}): {e}") from e
    if getattr(clip, "visual", None) is not None:
        clip.visual = None  # only the text tower is used; free the image tower
    text = getattr(clip, "text", None)
    if text is not None and not hasattr(text, "ln_final"):
        raise UserError(f"open_clip model {name!r} has a Hugging Face text tower, which latentpatch does not "
                        "support; choose a model with open_clip's own text transformer (e.g. ViT-B-32)")
    clip = clip.to(device).eval().requires_grad_(False)
    context_length = int(getattr(clip, "context_length", None) or getattr(text, "context_length"))
    max_length = context_length if max_length is None else int(max_length)
    if not 1 <= max_length <= context_length:
        raise UserError(f"text.max_length={max_length} must be between 1 and the model's context length "
                        f"{context_length}")
    ids = tokenizer([""], context_length=context_length)
    tokens, pooled = _text_forward(clip, ids.to(device), layer)
    record = {
        "library": "open_clip",
        "model": str(Path(model).resolve()) if config_sha else model,
        **identity,
        "config_sha256": config_sha,
        "max_length": int(max_length),
        "context_length": context_length,
        "width": int(tokens.shape[-1]),
        "pooled_dim": int(pooled.shape[-1]),
        "tokenizer": type(tokenizer).__name__,
        "layer": layer,
        "padding": padding,
    }
    return TextEncoder(clip, tokenizer, record, device)
