"""The one autoencoder interface every stage uses: images in [-1, 1] <-> normalised latents.

The latent normalisation lives here, once; subclasses only run their model on raw tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from latentpatch.errors import UserError

from .info import AutoencoderInfo

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA by default (fp16 overflows in some VAEs, e.g. SDXL's); float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise UserError(f"autoencoder dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")


class Autoencoder:
    """Thin, gradient-free, batched wrapper. Subclasses implement `_encode_raw` and `_decode_raw`.

    Runs under torch.no_grad rather than inference_mode: inference tensors cannot be saved for
    backward, so latents encoded on the fly could not be fed to a network being trained.
    """

    def __init__(self, info: AutoencoderInfo, device: torch.device, dtype: torch.dtype) -> None:
        self.info = info
        self.device = device
        self.dtype = dtype

    def _encode_raw(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def _decode_raw(self, raw: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_moments(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """[B,3,H,W] in [-1,1] -> normalised posterior (mean, std) as float32; std is None without a posterior."""
        f = self.info.factor
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % f or images.shape[3] % f:
            raise UserError(
                f"autoencoder {self.info.source} needs images [B,3,H,W] with H and W divisible by {f}; "
                f"got shape {tuple(images.shape)}"
            )
        mean, std = self._encode_raw(images.to(self.device, self.dtype))
        s, b = self.info.scaling_factor, self.info.shift_factor
        # Rombach et al. 2022, Sec. 4.3.2 (scale) and Esser et al. 2024, SD3 (shift): z_n = (z - shift) * scale
        mean_n = (mean.float() - b) * s
        return mean_n, None if std is None else std.float() * s

    def encode(self, images: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Normalised latents: a posterior sample z_n = mean_n + std_n * eps, or the mean when sample=False."""
        mean, std = self.encode_moments(images)
        if not sample or std is None:
            return mean
        gen_device = generator.device if generator is not None else mean.device
        eps = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=mean.dtype)
        return mean + std * eps.to(mean.device)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents [B,C,h,w] -> images [B,3,h*f,w*f], float32 clamped to [-1,1]."""
        c = self.info.latent_channels
        if latents.ndim != 4 or latents.shape[1] != c:
            raise UserError(
                f"autoencoder {self.info.source} decodes latents [B,{c},h,w]; got shape {tuple(latents.shape)}"
            )
        raw = latents.to(self.device, torch.float32) / self.info.scaling_factor + self.info.shift_factor
        return self._decode_raw(raw.to(self.dtype)).float().clamp_(-1.0, 1.0)

    def __repr__(self) -> str:
        i = self.info
        return (
            f"{type(self).__name__}({i.kind}, {i.source!r}, C={i.latent_channels}, f={i.factor}, "
            f"scale={i.scaling_factor}, shift={i.shift_factor}, {self.device}, {self.dtype})"
        )
