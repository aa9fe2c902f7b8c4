"""Train (or fine-tune) a small KL autoencoder on random image crops and save it as a diffusers folder.

The default recipe makes the builtin `latentpatch-vae-f4-v2`: factor 4, 4 latent channels, trained on the
photographs scikit-image ships with their hues turned over the whole circle and flat colour fields mixed in;
some images are held out, and scikit-learn's two sample photographs and a flat-colour check measure the result.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from latentpatch.device import resolve_device
from latentpatch.errors import UserError
from latentpatch.io import atomic_write_text, write_json_atomic

from . import data as vae_data
from .colour_check import QUICK_SET, colour_check, flat_colours
from ..loading import BUILTIN_NAME, WEIGHTS_DIR, load_autoencoder
from .export import export_vae, load_state, model_card, save_state
from .losses import kl_per_element, psnr, reconstruction_loss, ssim

REPORT_NAME = "train_vae_report.json"
EVAL_SEED = 1234  # held-out crop positions: the same for every run, so figures compare
QUICK_COLOURS = flat_colours(**QUICK_SET)
# Options that may change when resuming: they do not change the arithmetic of the steps already taken.
RESUMABLE = ("steps", "device", "eval_every", "checkpoint_every", "progress", "resume", "out", "reference_check")


@dataclass
class VAETrainConfig:
    """One train-vae run. With `init` the architecture comes from that VAE and `channels` etc. are unused."""

    out: Path
    data: Path | None = None  # image folder (recursive); None: the bundled skimage.data images
    init: str | None = None  # VAE to fine-tune: "builtin", a diffusers folder or a cached hub id
    train: str = "all"  # "all" or "decoder" (encoder frozen: latents, and so latent stores, stay valid)
    steps: int = 9000
    batch_size: int = 16
    crop: int = 32  # training crops; the nets are convolutional, and small crops buy 4x the steps of 64
    eval_crop: int | None = None  # side of the held-out crops; None: max(crop, 64), the size the bar is set at
    lr: float = 5e-4  # 1e-3 and 2e-3 leave flat saturated colours grey (scratch experiments in the model card)
    min_lr_ratio: float = 0.01
    warmup: int = 100
    seed: int = 0
    device: str | None = None
    holdout: int = 3
    channels: tuple[int, ...] = (32, 64, 64)  # block_out_channels; len - 1 halvings -> factor 4
    layers_per_block: int = 1
    norm_groups: int = 8
    latent_channels: int = 4
    kl_weight: float = 1e-6
    mse_weight: float = 0.5
    edge_weight: float = 0.0  # a Sobel term of 0.1 cost 4 dB held-out and left flat colours off by up to 0.45
    colour_jitter: float = 0.5  # fraction of crops turned to a random hue, with a random saturation factor
    saturation: tuple[float, float] = (0.5, 2.0)  # range of that factor (log-uniform)
    colour_fields: float = 0.5  # fraction of crops replaced by flat or smooth colour fields
    reference_check: bool = True  # measure on scikit-learn's sample photographs (needs the `vae` extra)
    eval_crops: int = 32
    eval_every: int = 250
    checkpoint_every: int = 250
    scale_crops: int = 256  # training crops encoded to measure the latent std
    max_side: int = 1024  # folder images are downscaled to this longer side
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.data = None if self.data is None else Path(self.data)
        self.channels = tuple(int(c) for c in self.channels)
        self.saturation = tuple(float(f) for f in self.saturation)
        if self.train not in ("all", "decoder"):
            raise UserError(f"--train {self.train!r} is not valid; use all or decoder")
        if self.train == "decoder" and self.init is None:
            raise UserError("--train decoder fine-tunes an existing VAE's decoder; give the VAE with --init")
        self.eval_crop = self.eval_crop or max(self.crop, 64)
        for name in ("steps", "batch_size", "crop", "eval_crops", "eval_every", "checkpoint_every", "scale_crops"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        for name in ("colour_jitter", "colour_fields"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"--{name.replace('_', '-')} is a fraction of the crops: between 0 and 1, "
                                f"not {getattr(self, name)}")
        if len(self.saturation) != 2 or not 0 < self.saturation[0] <= self.saturation[1]:
            raise UserError(f"--saturation {list(self.saturation)} must be two factors 0 < low <= high, e.g. 0.5,2")

    def recipe(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(out=str(self.out), data=None if self.data is None else str(self.data), channels=list(self.channels),
                 saturation=list(self.saturation))
        return d


@dataclass
class VAETrainResult:
    out: Path
    step: int
    heldout_psnr: float | None
    heldout_ssim: float | None
    scaling_factor: float
    seconds: float
    report: dict[str, Any] = field(repr=False, default_factory=dict)


@dataclass
class VAEData:
    source: str
    train_names: list[str]
    held_names: list[str]
    sampler: vae_data.CropSampler
    heldout: Tensor | None  # [eval_crops, 3, crop, crop] in [-1, 1]
    reference: Tensor | None  # the same from scikit-learn's sample photographs, never trained on


def load_data(cfg: VAETrainConfig) -> VAEData:
    """Images -> (train, held-out) split by image -> crop sampler and fixed held-out crops."""
    if cfg.data is None:
        images = {n: vae_data.load_skimage_image(n) for n in vae_data.SKIMAGE_IMAGES}
        source = f"skimage.data (bundled images, version {_skimage_version()})"
        order = vae_data.SKIMAGE_HOLDOUT_ORDER
    else:
        images = vae_data.load_folder_images(cfg.data, max(cfg.crop, cfg.eval_crop), cfg.max_side)
        source, order = str(Path(cfg.data).resolve()), ()
    train, held = vae_data.split_holdout(list(images), cfg.holdout, cfg.seed, order)
    sampler = vae_data.CropSampler.from_images([images[n] for n in train], cfg.crop)
    heldout = reference = None
    if held:
        heldout = vae_data.fixed_crops([images[n] for n in held], cfg.eval_crops, cfg.eval_crop, EVAL_SEED)
    if cfg.reference_check:
        photos = vae_data.load_reference_images()
        reference = vae_data.fixed_crops([photos[n] for n in vae_data.REFERENCE_IMAGES], cfg.eval_crops,
                                         cfg.eval_crop, EVAL_SEED)
    return VAEData(source, train, held, sampler, heldout, reference)


def build_model(cfg: VAETrainConfig) -> tuple[torch.nn.Module, str | None, float | None]:
    """(AutoencoderKL in float32, init source, init scaling factor): a new one from the config, or the init VAE."""
    from diffusers import AutoencoderKL

    if cfg.init is not None:
        ae = load_autoencoder(cfg.init, dtype=torch.float32)
        if ae.info.kind != "kl":
            raise UserError(f"--init {cfg.init} is a {ae.info.kind} autoencoder; train-vae trains AutoencoderKL only")
        return ae.model.requires_grad_(True).train(), ae.info.source, ae.info.scaling_factor
    bad = [c for c in cfg.channels if c % cfg.norm_groups]
    if bad or len(cfg.channels) < 2:
        raise UserError(f"--channels {list(cfg.channels)} must list at least 2 widths, each divisible by "
                        f"--norm-groups {cfg.norm_groups}")
    torch.manual_seed(cfg.seed)
    n = len(cfg.channels)
    model = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.channels), layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_groups, sample_size=cfg.crop,
        mid_block_add_attention=False,  # attention at 1/4 resolution costs much and adds little at these sizes
    )
    _easy_start(model)
    return model.train(), None, None


def _easy_start(model: torch.nn.Module) -> None:
    """Every ResNet block starts as the identity (its last conv zeroed, as in Goyal et al. 2017 and DiT), so the
    model starts shallow; and the posterior starts nearly deterministic (log-variance -8): with a KL weight of
    1e-6 the decoder would otherwise spend many steps decoding latents drowned in unit-variance noise."""
    from diffusers.models.resnet import ResnetBlock2D

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ResnetBlock2D):
                module.conv2.weight.zero_()
                module.conv2.bias.zero_()
        model.quant_conv.bias[model.config.latent_channels:] = -8.0


def trainable(model: torch.nn.Module, train: str) -> list[torch.nn.Parameter]:
    """The parameters to optimise; with "decoder" the encoder side is frozen so its weights stay bit-identical."""
    if train == "decoder":
        model.encoder.requires_grad_(False)
        if model.quant_conv is not None:
            model.quant_conv.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def lr_factor(step: int, cfg: VAETrainConfig) -> float:
    """Linear warm-up, then cosine decay from 1 to min_lr_ratio at the last step (Loshchilov & Hutter 2017)."""
    warmup = min(cfg.warmup, cfg.steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def reconstruct(model: torch.nn.Module, x: Tensor, batch: int = 32) -> Tensor:
    """Decode the posterior mean, in batches, without gradients."""
    with torch.no_grad():
        parts = [model.decode(model.encode(c).latent_dist.mean).sample for c in x.split(batch)]
    return torch.cat(parts).clamp(-1, 1)


def evaluate(x_hat: Tensor, x: Tensor) -> tuple[float, float]:
    """(mean PSNR in dB, mean SSIM) over the crops."""
    return float(psnr(x_hat, x).mean()), float(ssim(x_hat, x).mean())


def round_trip(ae: Any) -> Any:
    """images -> decoded posterior mean through the public Autoencoder path (normalise, decode, clamp)."""
    return lambda x: ae.decode(ae.encode_moments(x)[0])


def evaluate_autoencoder(ae: Any, crops: Tensor) -> tuple[float, float]:
    """Held-out figures through the public Autoencoder path, as users will run it."""
    x_hat = torch.cat([round_trip(ae)(c) for c in crops.split(32)])
    return evaluate(x_hat, crops.to(x_hat.device))


def latent_scaling_factor(model: torch.nn.Module, sampler: vae_data.CropSampler, n: int, seed: int,
                          device: torch.device) -> float:
    """1 / std of posterior samples of training crops (Rombach et al. 2022, Sec. 4.3.2 / App. G), so that
    normalised latents have unit variance for the diffusion model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = [model.encode(sampler.draw(min(32, n - i), g).to(device)).latent_dist.sample() for i in range(0, n, 32)]
    return float(1.0 / torch.cat(z).float().std())


def train_vae(cfg: VAETrainConfig, command: str | None = None) -> VAETrainResult:
    """Train, checkpoint every `checkpoint_every` steps (resumable with cfg.resume), export the diffusers folder,
    measure it on the held-out crops after loading it back, and write the report and model card."""
    start = time.time()
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    data = load_data(cfg)
    model, init_source, init_scale = build_model(cfg)
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    for name in ("crop", "eval_crop"):
        if getattr(cfg, name) % factor:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be a multiple of the VAE's "
                            f"downsampling factor {factor}")
    model.to(device)
    params = trainable(model, cfg.train)
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)
    step = load_state(out, model, optimizer, generator, cfg.recipe(), RESUMABLE) if cfg.resume else 0
    history = _train_loop(cfg, model, optimizer, generator, data, step, device, out)

    model.eval()
    if cfg.train == "decoder" and init_scale is not None:
        scale, note = init_scale, f"kept from the init VAE {init_source} (its encoder, hence its latents, is unchanged)"
    else:
        scale = latent_scaling_factor(model, data.sampler, cfg.scale_crops, cfg.seed + 1, device)
        note = f"1 / std of posterior samples of {cfg.scale_crops} training crops"
    export_vae(model, out, scale)
    saved = load_autoencoder(out)
    figures = evaluate_autoencoder(saved, data.heldout) if data.heldout is not None else (None, None)
    checks = {"colour_check": colour_check(round_trip(saved)).to_dict()}
    if data.reference is not None:
        checks["reference"] = _reference_report(saved, data.reference, cfg)
    seconds = time.time() - start
    report = _report(cfg, data, model, init_source, scale, note, figures, history, seconds, device, command)
    report.update(checks)
    write_json_atomic(out / REPORT_NAME, report)
    atomic_write_text(out / "README.md", model_card(report))
    for name in (REPORT_NAME, "README.md"):
        (out / name).chmod(0o644)  # shipped with the package when `out` is the builtin folder
    return VAETrainResult(out, cfg.steps, figures[0], figures[1], scale, seconds, report)


def _train_loop(cfg: VAETrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                generator: torch.Generator, data: VAEData, step: int, device: torch.device,
                out: Path) -> list[dict[str, float]]:
    from tqdm.auto import tqdm

    history: list[dict[str, float]] = []
    bar = tqdm(total=cfg.steps, initial=min(step, cfg.steps), disable=not cfg.progress, desc="train-vae",
               dynamic_ncols=True)
    while step < cfg.steps:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        x = data.sampler.draw(cfg.batch_size, generator)
        x = vae_data.jitter_colours(x, generator, cfg.colour_jitter, cfg.saturation)
        x = vae_data.mix_colour_fields(x, generator, cfg.colour_fields).to(device)
        with torch.set_grad_enabled(cfg.train == "all"):
            post = model.encode(x).latent_dist
        eps = torch.randn(post.mean.shape, generator=generator).to(device)
        x_hat = model.decode(post.mean + post.std * eps).sample
        loss = reconstruction_loss(x_hat, x, cfg.mse_weight, cfg.edge_weight)
        loss = loss + cfg.kl_weight * kl_per_element(post.mean, post.logvar)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr(x_hat.detach(), x).mean().item():.2f}")
        if data.heldout is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            model.eval()
            p, s = evaluate(reconstruct(model, data.heldout.to(device)), data.heldout.to(device))
            c = colour_check(lambda x: reconstruct(model, x.to(device)), QUICK_COLOURS, side=32).worst_channel_error
            model.train()
            history.append({"step": step, "loss": loss.item(), "heldout_psnr": p, "heldout_ssim": s, "colour_worst": c})
            bar.write(f"step {step}: held-out PSNR {p:.2f} dB, SSIM {s:.4f}, flat-colour worst error {c:.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_state(out, model, optimizer, generator, step, cfg.recipe())
    bar.close()
    return history


def _report(cfg: VAETrainConfig, data: VAEData, model: torch.nn.Module, init_source: str | None, scale: float,
            note: str, figures: tuple[float | None, float | None], history: list[dict[str, float]], seconds: float,
            device: torch.device, command: str | None) -> dict[str, Any]:
    c = model.config
    return {
        "name": cfg.out.name, "command": command or "(library call)", "data": data.source,
        "train_images": data.train_names, "held_out": data.held_names, "init": init_source,
        **{k: v for k, v in cfg.recipe().items() if k not in ("out", "data", "init", "progress", "resume")},
        "heldout_psnr": figures[0], "heldout_ssim": figures[1], "scaling_factor": scale, "latent_std": 1 / scale,
        "scaling_note": note,
        "architecture": {
            "factor": 2 ** (len(c.block_out_channels) - 1), "latent_channels": c.latent_channels,
            "block_out_channels": list(c.block_out_channels), "layers_per_block": c.layers_per_block,
            "norm_num_groups": c.norm_num_groups, "mid_block_add_attention": c.mid_block_add_attention,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "eval_seed": EVAL_SEED, "warmup": min(cfg.warmup, cfg.steps // 10), "seconds": seconds, "device": str(device),
        "history": history,
        "builtin": cfg.out.resolve() == (WEIGHTS_DIR / BUILTIN_NAME).resolve(),
    }


def _reference_report(ae: Any, crops: Tensor, cfg: VAETrainConfig) -> dict[str, Any]:
    """PSNR/SSIM on the reference crops, overall and by photograph (crop i comes from photograph i mod 2)."""
    import sklearn

    names = vae_data.REFERENCE_IMAGES
    psnr_all, ssim_all = evaluate_autoencoder(ae, crops)
    by_image = {n: dict(zip(("psnr", "ssim"), evaluate_autoencoder(ae, crops[i::len(names)])))
                for i, n in enumerate(names)}
    source = f"scikit-learn {sklearn.__version__} sklearn.datasets.load_sample_images() (china.jpg, flower.jpg)"
    return {"source": source,
            "crops": len(crops), "crop": cfg.eval_crop, "seed": EVAL_SEED, "psnr": psnr_all, "ssim": ssim_all,
            "by_image": by_image}


def _skimage_version() -> str:
    import skimage

    return skimage.__version__
