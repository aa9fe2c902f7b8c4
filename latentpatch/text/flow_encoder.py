"""The text encoders of StableDiffusion3Pipeline, FluxPipeline and StableDiffusionXLPipeline, frozen, behind the
TextEncoder interface: `text.model = "transformers:PIPELINE"` for an SD3 / SD3.5 / FLUX.1 / SDXL pipeline folder (or
cached hub id).

The pipeline itself is loaded with only its text parts (transformer and VAE left out) and its own
`encode_prompt` computes the features, so they are the pipeline's by construction:
- SD3: CLIP-L and CLIP-G penultimate hidden states concatenated, padded to T5's width, then T5's tokens:
  tokens [N, 77 + L, 4096]; pooled [N, 2048] the two CLIP projections (StableDiffusion3Pipeline.encode_prompt);
- FLUX: T5's tokens [N, L, 4096]; pooled [N, 768] CLIP-L's pooled output (FluxPipeline.encode_prompt);
- SDXL: CLIP-L's and CLIP-G's penultimate hidden states concatenated [N, 77, 2048]; pooled [N, 1280] CLIP-G's
  projection (StableDiffusionXLPipeline.encode_prompt). Where the pipeline config says force_zeros_for_empty_prompt
  (SDXL base), the empty caption is zeros, tokens and pooled: the unconditional input the pipeline's guidance gives
  and SDXL's training dropped captions to (so caption dropout and guidance use it; an empty prompt samples it too).
L is T5's max_sequence_length (record "max_length"; the pipelines' defaults: SD3 256, FLUX 512; SDXL: CLIP's 77).
Every position is attended, padding included, as the networks were trained: the record's padding is "pipeline" and
the mask all True. A longer caption is cut by each tower as the pipeline cuts it, with the one-line notice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from latentpatch.errors import UserError
from latentpatch.text.open_clip_encoder import TextEmbeddings, TextEncoder

# default max_sequence_length (SDXL: its CLIP tokenizers' fixed 77)
FLOW_TEXT_PIPELINES = {"StableDiffusion3Pipeline": 256, "FluxPipeline": 512, "StableDiffusionXLPipeline": 77}
SDXL = "StableDiffusionXLPipeline"
T5_LIMIT = 512  # both pipelines refuse a longer max_sequence_length
PIPELINE_PADDING = "pipeline"  # text.padding of these encoders: the pipeline's own, every position attended


def flow_pipeline_class(source: str) -> str | None:
    """The pipeline class of a local folder or cached hub id if it is SD3 / FLUX / SDXL, else None."""
    local = Path(source).expanduser()
    index = local / "model_index.json"
    if local.exists() and not index.is_file():
        return None
    try:
        if index.is_file():
            name = json.loads(index.read_text()).get("_class_name")
        else:
            from diffusers import DiffusionPipeline

            name = DiffusionPipeline.load_config(source).get("_class_name")
    except (OSError, ValueError):
        return None
    return name if name in FLOW_TEXT_PIPELINES else None


@contextlib.contextmanager
def _pipeline_logs_quiet(pipe: Any) -> Iterator[None]:
    """The pipeline logs a truncation warning of its own; the one-line notice replaces it."""
    logger = logging.getLogger(type(pipe).__module__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class FlowPipelineTextEncoder(TextEncoder):
    """A pipeline holding only its text encoders and tokenizers; `encode` is its encode_prompt."""

    @property
    def pipe(self) -> Any:
        return self.model

    def _notice_cuts(self, texts: Sequence[str]) -> None:
        pipe = self.pipe
        clip_length = pipe.tokenizer.model_max_length
        for text in texts:
            self._warn_if_cut(text, len(pipe.tokenizer(text).input_ids), clip_length, "CLIP")
        if self.record["pipeline"] == SDXL:  # both towers are CLIP's: the same cut
            return
        t5 = pipe.tokenizer_3 if self.record["pipeline"] == "StableDiffusion3Pipeline" else pipe.tokenizer_2
        for text in texts:
            self._warn_if_cut(text, len(t5(text).input_ids), self.max_length, "T5")

    @torch.no_grad()
    def _encode_prompt(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pipe = self.pipe
        with _pipeline_logs_quiet(pipe):
            if self.record["pipeline"] == "StableDiffusion3Pipeline":
                tokens, _, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None,
                                                          device=self.device, do_classifier_free_guidance=False,
                                                          max_sequence_length=self.max_length)
            elif self.record["pipeline"] == SDXL:
                tokens, _, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, device=self.device,
                                                          do_classifier_free_guidance=False)
                if self.record.get("empty_prompt") == "zeros":
                    empty = torch.tensor([t == "" for t in texts], device=tokens.device)
                    tokens = tokens.masked_fill(empty[:, None, None], 0.0)
                    pooled = pooled.masked_fill(empty[:, None], 0.0)
            else:
                tokens, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, device=self.device,
                                                       max_sequence_length=self.max_length)
        return tokens, pooled

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> TextEmbeddings:
        """Embeddings of `texts` in float32 on the CPU (mask all True), in batches of `batch_size`."""
        texts = [str(t) for t in texts]
        length = int(self.record.get("sequence_length", self.max_length))
        if not texts:
            return TextEmbeddings(torch.empty(0, length, self.width), torch.empty(0, length, dtype=torch.bool),
                                  torch.empty(0, self.pooled_dim))
        self._notice_cuts(texts)
        parts = [self._encode_prompt(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        tokens = torch.cat([p[0].float().cpu() for p in parts])
        pooled = torch.cat([p[1].float().cpu() for p in parts])
        return TextEmbeddings(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool), pooled)


def _towers(pipeline: str) -> list[str]:
    return ["text_encoder", "text_encoder_2"] + (["text_encoder_3"] if pipeline == "StableDiffusion3Pipeline" else [])


def _max_length(pipeline: str, max_length: int | None) -> int:
    """T5's max_sequence_length (SD3, FLUX), or SDXL's 77, which its encode_prompt does not let change."""
    if pipeline == SDXL:
        if max_length not in (None, FLOW_TEXT_PIPELINES[SDXL]):
            raise UserError(f"text.max_length={max_length}: SDXL's encode_prompt pads and cuts every prompt to its CLIP "
                            f"tokenizers' {FLOW_TEXT_PIPELINES[SDXL]} tokens; drop it")
        return FLOW_TEXT_PIPELINES[SDXL]
    max_length = FLOW_TEXT_PIPELINES[pipeline] if max_length is None else int(max_length)
    if not 1 <= max_length <= T5_LIMIT:
        raise UserError(f"text.max_length={max_length} (T5's max_sequence_length) must be between 1 and {T5_LIMIT}")
    return max_length


def _files_sha(source: str, towers: list[str]) -> str | None:
    """One sha256 over the weights of every text tower of a local folder (None for a hub id)."""
    from latentpatch.autoencoders import folder_revision

    if not Path(source).is_dir():
        return None
    lines = "".join(f"{t} {folder_revision(Path(source) / t)}\n" for t in towers)
    return hashlib.sha256(lines.encode()).hexdigest()


def load_flow_text_encoder(model: str, *, max_length: int | None, device: torch.device, layer: str | None,
                           padding: str | None) -> FlowPipelineTextEncoder:
    """The text encoders of the SD3 / FLUX / SDXL pipeline that "transformers:SOURCE" names (`layer` "last" and
    `padding` "pipeline", or None for those: these pipelines' features are fixed)."""
    from diffusers import DiffusionPipeline

    from latentpatch.text.identity import TRANSFORMERS_PREFIX
    from latentpatch.text.identity import need_transformers, split_source

    need_transformers()
    source = split_source(model)
    pipeline = flow_pipeline_class(source)
    if pipeline is None:
        raise UserError(f"{source} is not a StableDiffusion3Pipeline, FluxPipeline or StableDiffusionXLPipeline")
    if (layer or "last") != "last" or (padding or PIPELINE_PADDING) != PIPELINE_PADDING:
        raise UserError(f"the {pipeline}'s text features are its encode_prompt's: set text.layer=last and "
                        f"text.padding={PIPELINE_PADDING} (got {layer}, {padding})")
    max_length = _max_length(pipeline, max_length)
    if Path(source).expanduser().is_dir():
        source = str(Path(source).expanduser().resolve())
    network = "unet" if pipeline == SDXL else "transformer"  # loaded with its text parts only
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **{network: None}, vae=None, dtype=torch.float32)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"could not load the text encoders of {source}: {e}") from e
    towers = _towers(pipeline)
    missing = [t for t in towers if getattr(pipe, t, None) is None]
    if missing:
        raise UserError(f"{source} has no {', '.join(missing)}: latentpatch needs every text encoder the pipeline "
                        "was trained with")
    for tower in towers:
        getattr(pipe, tower).to(device).eval().requires_grad_(False)
    record = {
        "library": "diffusers", "model": TRANSFORMERS_PREFIX + source, "pretrained": None, "weights_sha256": None,
        "config_sha256": None, "files_sha256": _files_sha(source, towers), "max_length": max_length,
        "context_length": max_length if pipeline == SDXL else T5_LIMIT, "layer": "last", "padding": PIPELINE_PADDING,
        "pipeline": pipeline,
        "tokenizer": type(pipe.tokenizer).__name__, "width": 0, "pooled_dim": 0,
    }
    if pipeline == SDXL:
        record["empty_prompt"] = "zeros" if pipe.config.get("force_zeros_for_empty_prompt", True) else "encoded"
    encoder = FlowPipelineTextEncoder(pipe, None, record, device)
    null = encoder.encode([""])  # the widths, as the pipeline gives them
    record.update(width=int(null.tokens.shape[-1]), pooled_dim=int(null.pooled.shape[-1]),
                  sequence_length=int(null.tokens.shape[1]))
    encoder.width, encoder.pooled_dim = record["width"], record["pooled_dim"]
    return encoder
