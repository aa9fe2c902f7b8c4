"""Fine-tuning: continue a trained model on your own (small, captioned) images with patch training.

    import latentpatch as lp
    run = lp.finetune(base="runs/base", data="my_captioned_images/", out="runs/ft", steps=2000)
    images = lp.sample(run, prompts=["a red brick wall"], n=4, guidance=4.0)

`base` is a latentpatch run folder (its EMA or raw weights, same architecture; an unconditional DiT gains
zero-initialised cross-attention when the data has captions) or a pretrained diffusers model: a pipeline
folder or hub id (Stable Diffusion 1.x/2.x, DiT-XL/2) or a bare UNet2DModel / UNet2DConditionModel /
DiTTransformer2DModel folder (latentpatch.finetuning.diffusers_bases). A UNet's input gains zero-initialised
coordinate channels; a DiT stays stock, the crop's place given by its own position table; a pipeline keeps its
own preconditioning (the scheduler's DDPM schedule and prediction type, edm.precond "vp"), so before the first
step the fine-tune computes exactly the pretrained denoiser. `data` is an image folder
(encoded into OUT/latents with the base's autoencoder, captions embedded) or an existing latent store.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentpatch.config import RunConfig, apply_overrides, load_saved_config
from latentpatch.conditioning.spec import NO_TEXT
from latentpatch.data.buckets import MAX_ASPECT, default_bucket_step
from latentpatch.data.manifest import MANIFEST_NAME
from latentpatch.data.store import LatentStore
from latentpatch.device import resolve_device
from latentpatch.errors import UserError
from latentpatch.finetuning.starting_points import FinetuneBase, diffusers_base, load_choice, run_base
from latentpatch.io import write_json_atomic
from latentpatch.models.model_config import pretrained_latent_channels, pretrained_multiple
from latentpatch.runs import is_run_folder
from latentpatch.training.guard import CHOSEN_KEYS

LATENTS_DIR = "latents"
BASE_FILE = "finetune.json"
TEXT_KEY_PARTS = (".cross_attn.", "net.text_embedder.", "net.pooled_embedder.")  # what a DiT gains with text


@dataclass
class FinetuneResult:
    """The fine-tuned run; usable wherever a run folder is (`lp.sample(result, ...)`): it is os.PathLike."""

    run_dir: Path
    latents: Path
    step: int
    loss: float | None
    checkpoint: Path | None  # the newest; `sample` loads `best` when the fine-tune kept one
    seconds: float
    best: Path | None = None
    summary: str | None = None  # the held-out line (best loss and step, early stop), as `train` ends with

    def __fspath__(self) -> str:
        return str(self.run_dir)


def finetune(
    base: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    steps: int = 1000,
    weights: str = "ema",
    text_encoder: str | None = None,
    vae: str | None = None,
    resolution: int | None = None,
    lora_rank: int = 0,
    lr: float | None = None,
    batch_size: int | None = None,
    config: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    flip: bool = False,
    buckets: bool = False,
    bucket_step: int | None = None,
    max_aspect: float = MAX_ASPECT,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    callback: Callable[[Any], bool | str | None] | None = None,
) -> FinetuneResult:
    """Fine-tune `base` on `data` into the new run folder `out` for `steps` optimisation steps.

    text_encoder: "MODEL[:PRETRAINED]" of open_clip or "transformers:PIPELINE"; default the base run's, or for a
    pipeline its own text encoder (with transformers installed) else the open_clip tower whose features match
    (Stable Diffusion 1.x: ViT-L-14-quickgelu:openai, 2.x: ViT-H-14:laion2b_s32b_b79k, penultimate layer).
    vae / resolution: how an image folder is encoded (default: the base run's, or the pipeline's vae/ at the
    network's own size); buckets / bucket_step / max_aspect: encode it in aspect buckets of about resolution^2
    pixels instead of centre-cropping to a square (as `encode`).
    lora_rank > 0: train rank-r LoRA adapters on the attention projections instead of all weights (the
    checkpoints still hold whole weights, merged when loaded, so sampling needs nothing new).
    lr, batch_size, config (a preset or YAML, for a diffusers base) and `overrides` ("section.key=value")
    set the training; the rest comes from the base run. `resume` continues an interrupted fine-tune.
    callback: as train's (after each step; True ends the fine-tune after a checkpoint, EVALUATE scores the
    held-out set now), e.g. to stop at a budget of training time rather than of steps.
    """
    from latentpatch.training.trainer import train

    out = Path(out)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be a whole number >= 1, got {steps}")
    if lora_rank < 0:
        raise UserError(f"lora_rank must be >= 0, got {lora_rank}")
    if is_run_folder(base):
        if config is not None:
            raise UserError("config= (--config) is for a diffusers base; a run base keeps its own config "
                            "(change settings with overrides)")
        found = run_base(Path(base), weights)
        _check_text_choice(found, text_encoder)
    else:
        found = diffusers_base(str(base), config, text_encoder)
    bucketing = {"buckets": buckets, "bucket_step": bucket_step, "max_aspect": max_aspect}
    store = _prepare_data(found, Path(data), out, text_encoder, vae, resolution, flip, bucketing, device, progress)
    saved = out / "config.yaml"
    if resume and saved.is_file():  # the run's own config; only the number of steps may change
        cfg, resumed = load_saved_config(saved), True
    else:
        cfg = _finetune_config(found, store, text_encoder, steps, lora_rank, lr, batch_size, overrides)
        resumed = False
    state = _initial_state(found, cfg, store)
    found.state = {}  # the base's copy is no longer needed
    out.mkdir(parents=True, exist_ok=True)
    if not resumed:
        write_json_atomic(out / BASE_FILE, {**found.describe, "data": str(Path(data).resolve()),
                                            "lora_rank": lora_rank})
    result = train(None if resumed else cfg, store, out, resume=resume, max_steps=steps, device=device,
                   progress=progress, callback=callback, init_state=state)
    return FinetuneResult(out, store.path, result.step, result.loss, result.checkpoint, result.seconds,
                          result.best, result.summary())


def _prepare_data(
    found: FinetuneBase, data: Path, out: Path, text_encoder, vae, resolution, flip, bucketing: dict[str, Any],
    device, progress
) -> LatentStore:
    """The store to train on: `data` itself, or `data` encoded into OUT/latents with the base's autoencoder."""
    from latentpatch.encoding.encode import encode

    if (data / MANIFEST_NAME).is_file():
        store = LatentStore(data)
    elif data.is_dir():
        text = text_encoder
        if found.text_choice is not None:
            text = load_choice(found.text_choice, device)
        elif text is None and found.text_record is not None:
            from latentpatch.text.loader import load_text_encoder_from_record

            text = load_text_encoder_from_record(found.text_record, device=device)
        if vae is None and found.autoencoder is None and found.vae is None:
            raise UserError(f"the base {found.describe['base']} has no vae/ beside the network: give vae= (--vae), "
                            "the autoencoder whose latents it was trained on (e.g. stabilityai/sd-vae-ft-mse)")
        autoencoder = vae or found.vae or _load_vae(found.autoencoder, device)
        if bucketing["buckets"] and bucketing["bucket_step"] is None and found.cfg.model.arch == "pretrained":
            autoencoder = _loaded(autoencoder, device)  # its factor gives the pixels of a latent pixel
            bucketing = {**bucketing, "bucket_step": default_bucket_step(autoencoder.info.factor,
                                                                         pretrained_multiple(found.cfg.model.pretrained))}
        size = resolution or (tuple(found.resolution) if found.resolution else None)
        if size is None:
            raise UserError("give resolution= (--resolution): the pixel size to encode the images at")
        labels = "folders" if found.cfg.model.num_classes > 0 else None  # a class per top-level subfolder
        encode(data, out / LATENTS_DIR, autoencoder, size, device=device, flip=flip, text_encoder=text,
               progress=progress, labels=labels, **bucketing)
        store = LatentStore(out / LATENTS_DIR)
    else:
        raise UserError(f"data {data} is neither an image folder nor a latent store")
    if found.autoencoder is not None:
        store.require_latent_space(found.autoencoder, None, f"the base run {found.describe['base']} was trained on",
                                   "encode the images with the base's autoencoder")
    if found.cfg.model.arch == "pretrained":
        channels = pretrained_latent_channels(found.cfg.model.pretrained)
        if store.latent_shape[0] not in channels:
            raise UserError(f"the base network takes {channels[0]}-channel latents but {store.path} holds "
                            f"{store.latent_shape[0]}-channel ones; encode with the autoencoder it was trained with")
        factor = found.cfg.model.pretrained.vae_scale_factor  # an SDXL UNet's time ids are in pixels
        if factor and int(store.manifest.autoencoder["factor"]) != factor:
            raise UserError(f"the base's VAE has {factor} pixels per latent pixel but {store.path} was encoded with "
                            f"{store.manifest.autoencoder['factor']}; encode with the base pipeline's vae/")
    if found.cfg.model.num_classes > 0 and any(item.label is None for item in store.items):
        raise UserError(f"the base is class-conditional ({found.cfg.model.num_classes} classes) but {store.path} has "
                        "no class labels; put each image in a subfolder per class (encode --labels folders: the store's class k "
                        "trains the base's label k)")
    return store


def _loaded(vae: Any, device: str | None) -> Any:
    """An autoencoder given as a spec (hub id, folder, "builtin"), loaded; a loaded one as it is."""
    if not isinstance(vae, (str, os.PathLike)):
        return vae
    from latentpatch.autoencoders import load_autoencoder

    return load_autoencoder(str(vae), device=resolve_device(device))


def _load_vae(info: dict[str, Any], device: str | None) -> Any:
    from latentpatch.autoencoders import load_autoencoder_from_info

    return load_autoencoder_from_info(info, device=resolve_device(device))


def _finetune_config(found: FinetuneBase, store: LatentStore, text_encoder, steps, lora_rank, lr, batch_size,
                     overrides) -> RunConfig:
    from latentpatch.training.resolve import with_store

    cfg = copy.deepcopy(found.cfg)
    tc = cfg.train
    tc.max_steps, tc.ckpt_every, tc.log_every = steps, min(tc.ckpt_every, steps), min(tc.log_every, steps)
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(steps // 10, 1))  # it starts from trained weights
    cfg.model.lora_rank = lora_rank
    # Held-out evaluation is chosen for the new data as for any run (training/guard.py: on by default for a
    # small folder, with early stopping), not inherited from the base's data.
    cfg.heldout.latents = None
    for section, key in CHOSEN_KEYS:
        setattr(getattr(cfg, section), key, None)
    if lr is not None:
        cfg.optim.lr = float(lr)
    if batch_size is not None:
        tc.batch_size = int(batch_size)
    _choose_text(cfg, found, store, text_encoder)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    cfg, _, _ = with_store(cfg, store)  # text widths from the encoder, sigma_data from the latents
    if cfg.edm.precond == "flow":
        from latentpatch.finetuning.flow_bases import check_text_widths

        check_text_widths(cfg)
    unet_cfg = _pretrained_config(cfg) or {}
    if unet_cfg.get("cross_attention_dim") and cfg.model.text_dim != unet_cfg["cross_attention_dim"]:
        raise UserError(
            f"the text encoder {cfg.text.model}:{cfg.text.pretrained} gives tokens of width {cfg.model.text_dim} but "
            f"the UNet's cross_attention_dim is {unet_cfg['cross_attention_dim']}; choose an encoder of that width "
            "(Stable Diffusion 1.x: ViT-L-14-quickgelu:openai, 768; 2.x: ViT-H-14:laion2b_s32b_b79k, 1024)"
        )
    if cfg.model.arch == "unet" and found.cfg.model.text_dim != cfg.model.text_dim:
        raise UserError("a UNet run cannot gain (or lose) text conditioning by fine-tuning; set text.model=none "
                        "to fine-tune it without text, fine-tune a DiT run, or train a text UNet from scratch")
    return cfg


def _pretrained_config(cfg: RunConfig) -> dict[str, Any] | None:
    return cfg.model.pretrained.config if cfg.model.arch == "pretrained" else None


def _check_text_choice(found: FinetuneBase, text_encoder: str | None) -> None:
    """A run base trained with text keeps its encoder; a UNet2DModel has nothing to condition on text."""
    from latentpatch.text.identity import parse_text_encoder

    tc, unet_cfg = found.cfg.text, _pretrained_config(found.cfg)
    if text_encoder is None:
        return
    if tc.model and tc.model != NO_TEXT and parse_text_encoder(text_encoder) != (tc.model, tc.pretrained):
        raise UserError(f"the base was trained with text encoder {tc.model}:{tc.pretrained}; a fine-tune keeps "
                        "it (drop --text-encoder)")
    if unet_cfg is not None and unet_cfg.get("_class_name") == "UNet2DModel":
        raise UserError("the base UNet2DModel has no cross-attention, so it is fine-tuned without text; "
                        "drop --text-encoder (or start from a UNet2DConditionModel)")


def _choose_text(cfg: RunConfig, found: FinetuneBase, store: LatentStore, text_encoder: str | None) -> None:
    """Which encoder conditions the fine-tune: the base run's own; else the one asked for; else the store's
    cached one; else a pipeline's default (its own encoder, or the matching open_clip tower)."""
    from latentpatch.text.identity import parse_text_encoder

    if cfg.text.model:
        return
    unet_cfg = _pretrained_config(cfg)
    if unet_cfg is not None and unet_cfg.get("_class_name") == "UNet2DModel":
        cfg.text.model = NO_TEXT
        return
    choice, recorded = found.text_choice, store.manifest.text_encoder
    if text_encoder is None and recorded is not None and (choice is None or recorded["model"] != choice.model):
        return  # a store encoded with another encoder: derive_spec adopts it, its layer and padding
    if choice is not None:  # written out, so overrides (text.padding=...) change it
        tc = cfg.text
        tc.model, tc.pretrained, tc.layer, tc.padding = choice.model, choice.pretrained, choice.layer, choice.padding
        tc.max_length = (store.manifest.text_encoder or {}).get("max_length", tc.max_length)
    elif text_encoder is not None:
        cfg.text.model, cfg.text.pretrained = parse_text_encoder(text_encoder)
        cfg.text.max_length = (store.manifest.text_encoder or {}).get("max_length", cfg.text.max_length)
    elif unet_cfg is not None:
        raise UserError("the base UNet2DConditionModel needs a text encoder whose width is its cross_attention_dim "
                        f"({unet_cfg.get('cross_attention_dim')}): pass text_encoder= (--text-encoder)")


def _initial_state(found: FinetuneBase, cfg: RunConfig, store: LatentStore) -> dict[str, torch.Tensor]:
    """The base's weights in the fine-tune's architecture; a DiT that gains text gets its new layers zeroed
    where that keeps its output unchanged (cross-attention's output projection, the pooled-text map)."""
    from latentpatch.denoiser import build_precond

    plain = copy.deepcopy(cfg)
    plain.model.lora_rank = 0
    torch.manual_seed(cfg.train.seed)
    precond = build_precond(plain, store.latent_shape[0], device="cpu")
    missing, unexpected = precond.load_state_dict(found.state, strict=False)
    new = [k for k in missing if not any(part in k for part in TEXT_KEY_PARTS)]
    if unexpected or new:
        shown = ", ".join((unexpected or new)[:4])
        raise UserError(f"the base's weights do not fit the fine-tune's model ({shown}); the architecture must "
                        "stay the same (latent channels, model size)")
    pooled = getattr(precond.net, "pooled_embedder", None)
    if pooled is not None and any(k.startswith("net.pooled_embedder.") for k in missing):
        torch.nn.init.zeros_(pooled.weight)
        torch.nn.init.zeros_(pooled.bias)
    return {k: v.detach().clone() for k, v in precond.state_dict().items()}
