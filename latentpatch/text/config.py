"""The text section of a run's config: which encoder, which features, how captions are dropped."""

from __future__ import annotations

from dataclasses import dataclass

from latentpatch.errors import UserError

LAYERS = ("last", "penultimate")
PADDINGS = ("masked", "eot", "zero", "pipeline")  # "pipeline": SD3 / FLUX encoders only (text.flow_encoder)


@dataclass
class TextConfig:
    """Frozen open-clip text encoder (latentpatch.text); empty model means no text conditioning, unless the
    latent store holds cached text embeddings, whose encoder is then used ("none" trains without text)."""

    model: str = ""                 # open_clip name (ViT-B-32) or a model config .json file
    pretrained: str | None = None   # tag (laion2b_s34b_b79k), checkpoint file, or None: random weights
    caption_dropout: float = 0.1    # P(caption -> ""), which trains the unconditional model for guidance
    max_length: int = 77            # tokens kept for cross-attention (at most the model's context length)
    pooled: bool = True             # also feed the pooled embedding (adaLN / the UNet's time embedding)
    # Which features, as the pretrained model was trained on them (Stable Diffusion 1.x: last/eot, 2.x:
    # penultimate/zero). layer "last": tokens after the final layer norm; "penultimate": the second-to-last
    # block's output, then the final norm. padding "masked": padding is masked out of cross-attention;
    # "eot" / "zero": padded with the end-of-text token / id 0 and every position attended.
    # "pipeline": an SD3 / FLUX pipeline's own features (its encode_prompt, every position attended).
    layer: str = "last"
    padding: str = "masked"

    def check(self) -> None:
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise UserError(f"text.caption_dropout must be in [0, 1], got {self.caption_dropout}")
        check_features(self.layer, self.padding)


def check_features(layer: str, padding: str) -> None:
    if layer not in LAYERS:
        raise UserError(f"text.layer must be one of {', '.join(LAYERS)}, got {layer!r}")
    if padding not in PADDINGS:
        raise UserError(f"text.padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
