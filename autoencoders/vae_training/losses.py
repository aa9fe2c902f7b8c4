"""Losses and metrics for training a KL autoencoder on images in [-1, 1]."""

from __future__ import annotations

import kornia
import torch
from torch import Tensor


def reconstruction_loss(x_hat: Tensor, x: Tensor, mse_weight: float, edge_weight: float) -> Tensor:
    """L1 + mse_weight * MSE + edge_weight * L1 between image gradients (Sobel): the gradient term penalises
    blurred edges, which plain L1/MSE tolerate."""
    loss = (x_hat - x).abs().mean()
    if mse_weight:
        loss = loss + mse_weight * (x_hat - x).square().mean()
    if edge_weight:
        grad = kornia.filters.spatial_gradient  # [B,C,2,H,W], normalised Sobel
        loss = loss + edge_weight * (grad(x_hat) - grad(x)).abs().mean()
    return loss


def kl_per_element(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) averaged over latent elements (Kingma & Welling 2014, App. B):
    0.5 * (mean^2 + var - 1 - logvar)."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


def psnr(x_hat: Tensor, x: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [-1, 1], measured on the [0, 1] scale: 10 log10(1 / MSE)."""
    mse = ((x_hat.clamp(-1, 1) - x) / 2).square().flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def ssim(x_hat: Tensor, x: Tensor) -> Tensor:
    """Per-image SSIM (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5) on the [0, 1] scale, mean over
    channels and the pixels whose window lies inside the image (as skimage.metrics does)."""
    a, b = (x_hat.clamp(-1, 1) + 1) / 2, (x + 1) / 2
    return kornia.metrics.ssim(a, b, window_size=11, max_val=1.0, padding="valid").flatten(1).mean(1)
