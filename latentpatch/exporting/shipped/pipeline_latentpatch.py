"""The diffusers pipeline of a latentpatch export: full-size sampling with the full coordinate grid.

A Patch Diffusion network (Wang et al. 2023) sees two coordinate channels after the latent; at sampling time
they hold the full grid of the requested size (Sec. 3.3). This pipeline adds that grid and otherwise runs the
scheduler's standard loop (`set_timesteps`, `scale_model_input`, the network, `step`), with classifier-free
guidance, prompts or class labels, and decodes with the VAE. It is copied to the root of a `latentpatch
export` folder, named by model_index.json, and loaded with

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

It imports torch, diffusers and (for prompts, through the tokenizer and text encoder) transformers only,
never latentpatch. Its config (model_index.json) records what latentpatch decided when it trained the network:
the coordinate scale, the latent normalisation, the text features.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

COORDINATE_SCALES = ("per-axis", "longer-side")


def _axis(full: int, span: int | None) -> Tensor:
    """Coordinates of one axis of side R in float64: 2k/(R-1) - 1 (span None, [-1, 1]); with `span` S (the
    longer side) (2k - (R-1)) / (S-1), centred, so a shorter axis spans less."""
    k = torch.arange(full, dtype=torch.float64)
    if span is None:
        return 2.0 * k / max(full - 1, 1) - 1.0
    return (2.0 * k - (full - 1)) / max(span - 1, 1)


def coordinate_grid(height: int, width: int, scale: str = "per-axis") -> Tensor:
    """[2, h, w] float32 coordinates of the full latent grid (channel 0 x, 1 y): latentpatch's one coordinate
    function (latentpatch/patches.py) at full size. "per-axis": each axis spans [-1, 1]; "longer-side": both
    axes are scaled by the longer side (the same grid on a square)."""
    if scale not in COORDINATE_SCALES:
        raise ValueError(f"unknown coordinate scale {scale!r}; one of {COORDINATE_SCALES}")
    span = max(height, width) if scale == "longer-side" and height != width else None
    x, y = _axis(width, span).float(), _axis(height, span).float()
    return torch.stack([x[None, :].expand(height, width), y[:, None].expand(height, width)])


def encode_text(tokenizer: Any, text_encoder: Any, texts: list[str], max_length: int, layer: str,
                padding: str) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens [N, L, D], mask [N, L] bool, pooled [N, P]) of `texts`, the features latentpatch trained with.

    Positions after the first end-of-text token are padding: "masked" leaves the tokenizer's padding and masks
    it out of cross-attention; "eot" / "zero" pad with the end-of-text id / id 0 and attend to every position
    (Stable Diffusion 1.x / 2.x). layer "penultimate": the second-to-last layer through the final layer norm.
    The pooled embedding is the encoder's own (projected when it has a projection).
    """
    ids = tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    eot = tokenizer.eos_token_id
    is_eot = ids == eot
    first = torch.where(is_eot.any(1), is_eot.int().argmax(1), torch.full_like(ids[:, 0], ids.shape[1] - 1))
    real = torch.arange(ids.shape[1])[None] <= first[:, None]
    if padding == "eot":
        ids = torch.where(real, ids, torch.full_like(ids, eot))
    elif padding == "zero":
        ids = torch.where(real, ids, torch.zeros_like(ids))
    out = text_encoder(input_ids=ids.to(text_encoder.device), output_hidden_states=layer == "penultimate")
    if layer == "last":
        tokens = out.last_hidden_state
    else:
        tokens = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(out.hidden_states[-2])
    pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
    mask = real if padding == "masked" else torch.ones_like(real)
    return tokens.float(), mask.to(tokens.device), pooled.float()


def _repeat(inputs: dict, count: int) -> dict:
    """Each row of every input `count` times in a row (num_images_per_prompt)."""
    return {k: None if v is None else v.repeat_interleave(count, 0) for k, v in inputs.items()}


def trim_to_longest(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop trailing positions that are padding in every row (as latentpatch does before cross-attention)."""
    length = max(int(mask.sum(dim=1).max()), 1)
    return tokens[:, :length], mask[:, :length]


class LatentPatchPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """A coordinate-channel denoiser (`unet`: a diffusers UNet with C+2 input channels, or `transformer`:
    latentpatch's DiT or a diffusers DiT with C+2 input channels, or a stock diffusers DiT with C, coordinate_channels
    0), its scheduler, VAE (None: pixel space), and, for prompts, its text encoder and tokenizer.
    `load_lora_weights` serves a `unet`."""

    model_cpu_offload_seq = "text_encoder->unet->transformer->vae"
    _optional_components = ["unet", "transformer", "vae", "text_encoder", "tokenizer"]

    def __init__(self, scheduler: Any, unet: Any = None, transformer: Any = None, vae: Any = None,
                 text_encoder: Any = None, tokenizer: Any = None, coordinate_scale: str = "per-axis",
                 sample_size: list[int] | None = None, latent_channels: int = 4, coordinate_channels: int = 2,
                 autoencoder_factor: int = 1,
                 size_multiple: int = 1, latent_scaling_factor: float = 1.0, latent_shift_factor: float = 0.0,
                 num_classes: int = 0, text_max_length: int = 77, text_layer: str = "last",
                 text_padding: str = "masked", text_pooled: bool = False) -> None:
        super().__init__()
        self.register_modules(unet=unet, transformer=transformer, scheduler=scheduler, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(
            coordinate_scale=coordinate_scale, sample_size=list(sample_size or [32, 32]),
            latent_channels=latent_channels, coordinate_channels=coordinate_channels,
            autoencoder_factor=autoencoder_factor, size_multiple=size_multiple,
            latent_scaling_factor=latent_scaling_factor, latent_shift_factor=latent_shift_factor,
            num_classes=num_classes, text_max_length=text_max_length, text_layer=text_layer,
            text_padding=text_padding, text_pooled=text_pooled)
        self.image_processor = VaeImageProcessor(vae_scale_factor=autoencoder_factor)

    @property
    def denoiser(self) -> Any:
        return self.unet if self.unet is not None else self.transformer

    # --- conditioning --------------------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], negative: list[str]) -> tuple[dict, dict]:
        """The network's text inputs for `prompts` and for `negative` (the empty caption by default)."""
        cfg = self.config
        tokens, mask, pooled = encode_text(self.tokenizer, self.text_encoder, prompts + negative,
                                           cfg.text_max_length, cfg.text_layer, cfg.text_padding)
        tokens, mask = trim_to_longest(tokens, mask)
        both = {"text": tokens, "mask": mask, "pooled": pooled if cfg.text_pooled else None}
        n = len(prompts)
        return ({k: None if v is None else v[:n] for k, v in both.items()},
                {k: None if v is None else v[n:] for k, v in both.items()})

    def _labels(self, class_labels: Any, count: int, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        k = self.config.num_classes
        if k == 0:
            if class_labels is not None:
                raise ValueError("this model has no classes; drop class_labels")
            return None, None
        if class_labels is None:
            if self.text_encoder is None:
                raise ValueError(f"this model is class-conditional: pass class_labels (0..{k - 1})")
            return None, None  # a text model with classes: the null label (_conditioning), as latentpatch samples it
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if bool(((labels < 0) | (labels >= k)).any()):
            raise ValueError(f"class_labels must be in 0..{k - 1}, got {labels.tolist()}")
        labels = labels.repeat_interleave(count).to(device)
        return labels, torch.full_like(labels, k)

    def _conditioning(self, prompt: Any, negative_prompt: Any, class_labels: Any, count: int,
                      device: torch.device) -> tuple[int, dict, dict]:
        """(batch, cond, uncond): one entry per image, `count` images per prompt / label (or in all)."""
        cond: dict[str, Tensor | None] = {}
        uncond: dict[str, Tensor | None] = {}
        batch = count
        if self.text_encoder is not None:
            if prompt is None:
                raise ValueError('this model is text-conditioned: pass prompt ("" samples it unconditionally)')
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            negative = negative_prompt if negative_prompt is not None else ""
            negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
            if len(negative) != len(prompts):
                raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
            cond, uncond = (_repeat(d, count) for d in self.encode_prompt(prompts, negative))
            batch = len(prompts) * count
        elif prompt is not None:
            raise ValueError("this model is not text-conditioned; drop prompt")
        labels, null = self._labels(class_labels, count, device)
        if labels is None and self.config.num_classes:
            labels = null = torch.full((batch,), self.config.num_classes, dtype=torch.long, device=device)
        if labels is not None:
            if cond and labels.shape[0] != batch:
                raise ValueError("give one class label per prompt")
            cond["labels"], uncond["labels"], batch = labels, null, labels.shape[0]
        return batch, cond, uncond

    # --- the network ---------------------------------------------------------------------------------------

    def _network(self, x_in: Tensor, t: Tensor, coords: Tensor, cond: dict) -> Tensor:
        """The raw network output (EDM's F, or a pretrained model's eps / v) for the latent channels, float32."""
        net = self.denoiser
        # a stock DiT (coordinate_channels 0) places its tokens with its own sin-cos table at the size it is given
        x = torch.cat([x_in, coords], dim=1) if self.config.coordinate_channels else x_in
        if not getattr(net, "keeps_float32_coordinates", False):
            x = x.to(net.dtype)
        t = t.to(x.device).reshape(-1).expand(x.shape[0])
        kwargs: dict[str, Any] = {}
        if cond.get("labels") is not None:
            kwargs["class_labels"] = cond["labels"]
        if cond.get("text") is not None:
            mask = cond["mask"]
            kwargs["encoder_hidden_states"] = cond["text"].to(net.dtype)
            if self.unet is not None:
                # a diffusers UNet reads every position attended as no mask at all
                kwargs["encoder_attention_mask"] = None if bool(mask.all()) else mask
                if cond.get("pooled") is not None and net.config.time_cond_proj_dim:
                    kwargs["timestep_cond"] = cond["pooled"].to(net.dtype)
            else:
                kwargs["encoder_attention_mask"] = mask
                kwargs["pooled_projections"] = cond.get("pooled")
        if self.unet is not None:
            out = net(x, t, return_dict=False, **kwargs)[0]
        else:
            out = net(x, timestep=t, return_dict=False, **kwargs)[0]
        return out[:, : self.config.latent_channels].float()  # a learned-sigma DiT: the mean channels

    def _guided(self, x_in: Tensor, t: Tensor, coords: Tensor, cond: dict, uncond: dict, scale: float) -> Tensor:
        """F_u + scale (F_c - F_u) in one batch of 2B; latentpatch guides D = c_skip x + c_out F, the same thing
        since c_skip x and c_out are shared by both halves. Scale 1: the conditional model alone, 0: the
        unconditional one."""
        if scale == 1:
            return self._network(x_in, t, coords, cond)
        if scale == 0:
            return self._network(x_in, t, coords, uncond)
        both = {k: None if cond[k] is None else torch.cat([uncond[k], cond[k]]) for k in cond}
        out_u, out_c = self._network(torch.cat([x_in, x_in]), t, torch.cat([coords, coords]), both).chunk(2)
        return out_u + scale * (out_c - out_u)

    # --- sampling ------------------------------------------------------------------------------------------

    def _latent_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        cfg = self.config
        f, m = cfg.autoencoder_factor, cfg.size_multiple
        h0, w0 = cfg.sample_size
        height, width = height or h0 * f, width or w0 * f
        if height % (f * m) or width % (f * m):
            raise ValueError(f"height and width must be multiples of {f * m} (the autoencoder's factor {f} x the "
                             f"network's size multiple {m}), got {height}x{width}")
        return height // f, width // f

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents -> images in [-1, 1]: z = z_n / scale + shift, then the VAE (none: pixels)."""
        raw = latents / self.config.latent_scaling_factor + self.config.latent_shift_factor
        if self.vae is not None:
            raw = self.vae.decode(raw.to(self.vae.dtype)).sample
        return raw.float().clamp(-1.0, 1.0)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, class_labels: int | list[int] | None = None,
                 negative_prompt: str | list[str] | None = None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int = 18, guidance_scale: float = 1.0,
                 num_images_per_prompt: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: Tensor | None = None, output_type: str = "pil", return_dict: bool = True):
        """Images of `height` x `width` pixels (default: the training size), `num_images_per_prompt` per prompt
        or class label (or in all), `num_inference_steps` noise levels of the scheduler's schedule.

        guidance_scale: classifier-free guidance, 1 = none, 0 = the unconditional model. generator: one per
        image gives each image its own noise whatever the batch (latentpatch seeds image i's generator with
        `latentpatch.seeding.image_seed(seed, i)`). latents: the starting N(0, I) noise [B, C, h, w] instead.
        output_type: "pil", "np", "pt" or "latent" (the normalised latents).
        """
        device = self._execution_device
        h, w = self._latent_size(height, width)
        batch, cond, uncond = self._conditioning(prompt, negative_prompt, class_labels, num_images_per_prompt,
                                                 device)
        if guidance_scale != 1 and not cond:
            raise ValueError(f"guidance_scale {guidance_scale} needs a class- or text-conditioned model")
        coords = coordinate_grid(h, w, self.config.coordinate_scale).to(device)
        coords = coords.expand(batch, 2, h, w)
        shape = (batch, self.config.latent_channels, h, w)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        # Every scheduler an export carries integrates x = x0 + sigma * noise from the largest sigma (Karras et al.
        # 2022, Algorithm 1); EDM schedulers' init_noise_sigma, sqrt(sigma_max^2 + 1), is the VP convention.
        latents = latents.to(device, torch.float32) * self.scheduler.sigmas[0].to(device)
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = self.scheduler.scale_model_input(latents, t)
            out = self._guided(x_in, t, coords, cond, uncond, guidance_scale)
            latents = self.scheduler.step(out, t, latents, return_dict=False)[0]
        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(self.decode(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
