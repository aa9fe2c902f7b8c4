"""FID, KID and precision/recall on Inception features; reference statistics saved as pytorch-fid's .npz.

A stats file holds `mu` [D] and `sigma` [D,D] (pytorch-fid's keys, so its files load here and ours there), plus
`n`, `extractor` (the feature network's identity) and optionally `features` [n,D] float32, which KID and
precision/recall need (mu and sigma alone are not enough for them).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from latentpatch.errors import UserError
from latentpatch.io import atomic_write_bytes
from latentpatch.metrics.inception import ImageSource, InceptionFeatures, extract_features, load_inception


@dataclass
class FeatureStats:
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D,D] float64
    n: int | None = None  # None for files without a count (pytorch-fid's)
    extractor: str = ""  # feature network identity; "" when unknown
    features: np.ndarray | None = None  # [n,D] float32, kept for KID and precision/recall

    @classmethod
    def from_features(cls, features, extractor: str = "", keep_features: bool = True) -> FeatureStats:
        feats = torch.as_tensor(features).double().cpu().numpy()
        if feats.ndim != 2 or len(feats) < 2:
            raise UserError(f"need at least 2 feature vectors [n,D] for statistics, got shape {feats.shape}")
        return cls(
            mu=feats.mean(axis=0),
            sigma=np.cov(feats, rowvar=False),
            n=len(feats),
            extractor=extractor,
            features=feats.astype(np.float32) if keep_features else None,
        )

    def save(self, path: str | os.PathLike, with_features: bool = True) -> None:
        arrays = {"mu": self.mu, "sigma": self.sigma, "n": np.int64(-1 if self.n is None else self.n),
                  "extractor": np.str_(self.extractor)}
        if with_features and self.features is not None:
            arrays["features"] = self.features
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"statistics file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in ("mu", "sigma") if k not in data.files]
                if missing:
                    raise UserError(f"{path} lacks {' and '.join(missing)}: not a FID statistics .npz")
                n = int(data["n"]) if "n" in data.files else -1
                return cls(
                    mu=data["mu"].astype(np.float64),
                    sigma=data["sigma"].astype(np.float64),
                    n=None if n < 0 else n,
                    extractor=str(data["extractor"]) if "extractor" in data.files else "",
                    features=data["features"] if "features" in data.files else None,
                )
        except (OSError, ValueError) as e:
            raise UserError(f"could not read statistics file {path}: {e}") from e


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) (Heusel et al. 2017, Eq. 6; numerics as pytorch-fid)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise UserError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Near-singular product (fewer samples than dimensions): regularise both covariances a little.
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = np.max(np.abs(covmean.imag))
            raise UserError(f"FID matrix square root is not real (imaginary part {worst:.3g}); use more images")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_features(x, y) -> float:
    """The same d² from the feature sets, exactly: with S = AᵀA and A = (X - mu) / sqrt(n - 1),
    Tr (Sx Sy)^½ = ||Ax Ayᵀ||_* (nuclear norm; the non-zero eigenvalues of Sx Sy are those of C Cᵀ, C = Ax Ayᵀ).
    O(nx ny D): cheaper and better conditioned than a D x D sqrtm when there are fewer samples than dimensions."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise UserError(f"need two feature sets [n,D] with n >= 2 and one D, got {x.shape} and {y.shape}")
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    a_x = (x - mu_x) / np.sqrt(len(x) - 1)
    a_y = (y - mu_y) / np.sqrt(len(y) - 1)
    diff = mu_x - mu_y
    nuclear = np.linalg.svd(a_x @ a_y.T, compute_uv=False).sum()
    return float(diff @ diff + (a_x * a_x).sum() + (a_y * a_y).sum() - 2.0 * nuclear)


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x·y / d + 1)³, the KID kernel (Bińkowski et al. 2018, Sec. 3)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
    """Unbiased MMD² (Gretton et al. 2012, Eq. 3) with the cubic kernel; can be negative when x ~ y."""
    x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise UserError(f"KID needs at least 2 samples per set, got {m} and {n}")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kxy.sum() / (m * n))


def kid(x, y, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of MMD² over random subsets (as torch-fidelity; size min(1000, n))."""
    x, y = torch.as_tensor(x).double(), torch.as_tensor(y).double()
    size = min(subset_size, len(x), len(y))
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_subsets):
        ix = torch.randperm(len(x), generator=generator)[:size]
        iy = torch.randperm(len(y), generator=generator)[:size]
        values.append(mmd2_unbiased(x[ix], y[iy]))
    values = np.array(values)
    return float(values.mean()), float(values.std())


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    """For each point: is it inside some centre's k-NN ball?"""
    return torch.cat([(torch.cdist(p, centres) <= radii).any(dim=1) for p in points.split(chunk)])


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    # k+1: each point is its own nearest neighbour at distance 0.
    return torch.cat([torch.cdist(p, x).kthvalue(k + 1, dim=1).values for p in x.split(chunk)])


def precision_recall(real, fake, *, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eq. 1-2): the fraction of fake samples inside the
    real manifold (union of k-NN balls) and of real samples inside the fake one. O(n²) distances via torch.cdist."""
    real, fake = torch.as_tensor(real).float(), torch.as_tensor(fake).float()
    if len(real) <= k or len(fake) <= k:
        raise UserError(f"precision/recall with k={k} needs more than {k} samples per set, "
                        f"got {len(real)} and {len(fake)}")
    precision = _covered(fake, real, _knn_radii(real, k, chunk), chunk).double().mean()
    recall = _covered(real, fake, _knn_radii(fake, k, chunk), chunk).double().mean()
    return float(precision), float(recall)


def is_stats_file(source) -> bool:
    """Whether `source` names a statistics file (.npz, any case) rather than images."""
    return isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() == ".npz"


class _LazyExtractor:
    """Loads the Inception only when some input actually consists of images."""

    def __init__(self, extractor: InceptionFeatures | None, device):
        self.extractor, self.device = extractor, device

    def get(self) -> InceptionFeatures:
        if self.extractor is None:
            self.extractor = load_inception(device=self.device)
        return self.extractor


def _stats(source, lazy: _LazyExtractor, batch_size: int, progress: bool) -> FeatureStats:
    if isinstance(source, FeatureStats):
        return source
    if is_stats_file(source):
        return FeatureStats.load(source)
    extractor = lazy.get()
    feats = extract_features(source, extractor, batch_size=batch_size, progress=progress)
    return FeatureStats.from_features(feats, extractor.identity)


def feature_stats(
    source: ImageSource | FeatureStats,
    *,
    extractor: InceptionFeatures | None = None,
    batch_size: int = 32,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> FeatureStats:
    """Statistics (with features) of images (tensor, list or folder), or those stored in an .npz file."""
    return _stats(source, _LazyExtractor(extractor, device), batch_size, progress)


def _check_same_extractor(a: FeatureStats, b: FeatureStats) -> None:
    if a.extractor and b.extractor and a.extractor != b.extractor:
        warnings.warn(f"comparing features of different networks: {a.extractor} vs {b.extractor}", stacklevel=3)


def _fid(a: FeatureStats, b: FeatureStats) -> float:
    """Below D samples per set the covariances are singular: use the exact feature form, else pytorch-fid's sqrtm."""
    if a.features is not None and b.features is not None and max(len(a.features), len(b.features)) < len(a.mu):
        return frechet_distance_features(a.features, b.features)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def evaluate(
    generated: ImageSource | FeatureStats,
    reference: ImageSource | FeatureStats,
    *,
    extractor: InceptionFeatures | None = None,
    with_kid: bool = True,
    with_precision_recall: bool = False,
    k: int = 3,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> dict[str, float | int | str]:
    """FID (and KID, precision/recall) of generated images against a reference folder, tensor or stats .npz.

    KID and precision/recall need reference features: a stats file saved without them (e.g. pytorch-fid's)
    gives FID only, and asking for the others then is an error."""
    lazy = _LazyExtractor(extractor, device)
    gen = _stats(generated, lazy, batch_size, progress)
    ref = _stats(reference, lazy, batch_size, progress)
    _check_same_extractor(gen, ref)
    result: dict[str, float | int | str] = {
        "fid": _fid(gen, ref),
        "n_generated": gen.n if gen.n is not None else -1,
        "n_reference": ref.n if ref.n is not None else -1,
        "extractor": gen.extractor or ref.extractor,
    }
    if with_kid or with_precision_recall:
        for name, stats in (("generated", gen), ("reference", ref)):
            if stats.features is None:
                raise UserError(f"the {name} statistics hold no features: KID and precision/recall need them "
                                "(recompute the stats from images, or ask for FID only)")
    if with_kid:
        result["kid"], result["kid_std"] = kid(gen.features, ref.features, seed=seed)
    if with_precision_recall:
        result["precision"], result["recall"] = precision_recall(ref.features, gen.features, k=k)
    return result


def fid(generated: ImageSource | FeatureStats, reference: ImageSource | FeatureStats, **kwargs) -> float:
    """FID only; same inputs and keywords as `evaluate`."""
    return float(evaluate(generated, reference, with_kid=False, with_precision_recall=False, **kwargs)["fid"])
