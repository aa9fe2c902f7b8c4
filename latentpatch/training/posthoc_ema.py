"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
Sec. 3.1, App. C.1-C.2): train with a few power-function EMA profiles, snapshot them now and then, and after
training reconstruct the EMA of any other width as a least-squares combination of the snapshots.

A power-function EMA at time t weights every past moment tau by tau^gamma (t and tau count images, as the
EMA does); its width relative to the training time is sigma_rel. Snapshots are written by rank 0 as

    RUN/posthoc/snapshots/step-XXXXXXXX.safetensors   every profile's weights (keys `std0.050.<name>`),
                                                      metadata "posthoc": step, t, stds, buffers
    RUN/posthoc/std-0.100-step-XXXXXXXX/              a reconstruction, a checkpoint folder `sample` loads
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from latentpatch import checkpoints as ckpt_io
from latentpatch.errors import UserError
from latentpatch.io import atomic_save_safetensors
from latentpatch.training.ema import make_ema
from latentpatch.train_config import check_std

POSTHOC_DIR = "posthoc"
SNAPSHOT_DIR = "snapshots"


def exp_to_std(gamma: float) -> float:
    """sigma_rel of the power profile with exponent gamma (Sec. 3.1, App. C.1)."""
    g = float(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def std_to_exp(sigma_rel: float) -> float:
    """The exponent gamma of relative std `sigma_rel`: the largest real root of
    sigma^2 (g+2)^2 (g+3) - (g+1) = 0 (exp_to_std solved for g)."""
    s2 = check_std(sigma_rel) ** 2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_beta(gamma: float, t: float, dt: float) -> float:
    """The EMA decay of a step that brings the count to `t` after `dt` new images: (1 - dt/t)^(gamma+1) (Sec. 3.1,
    with images for steps). The average is then sum_k (t_k^(g+1) - t_{k-1}^(g+1)) x_k / t^(g+1), the profile
    (g+1) tau^g / t^(g+1) integrated over each step."""
    return (1.0 - dt / t) ** (gamma + 1)


def profile_prefix(sigma_rel: float) -> str:
    return f"std{sigma_rel:.3f}."


class PosthocProfiles:
    """One frozen copy of the model per sigma_rel, each a power-function EMA of the training weights."""

    def __init__(self, module: nn.Module, stds: list[float]):
        self.stds = [float(s) for s in stds]
        self.gammas = [std_to_exp(s) for s in self.stds]
        self.copies = [make_ema(module) for _ in self.stds]
        self.buffer_names = [name for name, _ in module.named_buffers()]

    @torch.no_grad()
    def update(self, module: nn.Module, t: float, dt: float) -> None:
        """Average in the weights of the step that brought the count to `t` (`dt` of it this step)."""
        params = [p.detach() for p in module.parameters()]
        for gamma, copy in zip(self.gammas, self.copies):
            torch._foreach_lerp_(list(copy.parameters()), params, 1.0 - power_beta(gamma, t, dt))
            for b_copy, b in zip(copy.buffers(), module.buffers()):
                b_copy.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {profile_prefix(s) + k: v for s, c in zip(self.stds, self.copies) for k, v in c.state_dict().items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], where: str = "the checkpoint") -> None:
        for std, copy in zip(self.stds, self.copies):
            prefix = profile_prefix(std)
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if own.keys() != copy.state_dict().keys():
                raise UserError(f"{where} holds no complete post-hoc EMA profile for std {std} (train.posthoc_stds); "
                                "was the run's config.yaml edited after it was written?")
            copy.load_state_dict(own, strict=True)

    def snapshot(self, path: str | os.PathLike, step: int, t: float) -> None:
        """Every profile's weights in one safetensors file, written atomically."""
        # One metadata key: safetensors writes several in a per-process hash order, and a resumed run must
        # write the same bytes as an uninterrupted one.
        meta = {"step": step, "t": float(t), "stds": self.stds, "buffers": self.buffer_names}
        atomic_save_safetensors(self.state_dict(), path, metadata={"posthoc": json.dumps(meta)})


def snapshot_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / POSTHOC_DIR / SNAPSHOT_DIR / f"{ckpt_io.checkpoint_name(step)}.safetensors"


# --- reconstruction ---------------------------------------------------------------------------------------


def solve_weights(snapshots: list[tuple[float, float]], gamma_r: float, t_r: float) -> np.ndarray:
    """The weights w minimising || sum_i w_i p_i - p_r ||_2 over power profiles p = (g+1) tau^g / t^(g+1) on [0, t]
    (App. C.2), `snapshots` as (gamma_i, t_i). The inner products are closed-form; computed in float64 in logs
    of times scaled by their maximum, so no power overflows."""
    g = np.array([s[0] for s in snapshots] + [gamma_r], dtype=np.float64)
    t = np.array([s[1] for s in snapshots] + [t_r], dtype=np.float64)
    log_t = np.log(t / t.max())
    gi, gj = g[:, None], g[None, :]
    log_m = np.minimum(log_t[:, None], log_t[None, :])
    # <p_i, p_j> = (g_i+1)(g_j+1) m^(g_i+g_j+1) / ((g_i+g_j+1) t_i^(g_i+1) t_j^(g_j+1)),  m = min(t_i, t_j)
    dot = np.exp(np.log((gi + 1) * (gj + 1) / (gi + gj + 1)) + (gi + gj + 1) * log_m
                 - (gi + 1) * log_t[:, None] - (gj + 1) * log_t[None, :])
    w, *_ = np.linalg.lstsq(dot[:-1, :-1], dot[:-1, -1], rcond=None)
    return w


@dataclass
class Snapshot:
    path: Path
    step: int
    t: float
    stds: list[float]
    buffers: list[str]


def read_snapshots(run_dir: str | os.PathLike) -> list[Snapshot]:
    """The run's snapshot files, oldest first (their headers only)."""
    folder = Path(run_dir) / POSTHOC_DIR / SNAPSHOT_DIR
    found = []
    for path in sorted(folder.glob("step-*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {})["posthoc"])
            found.append(Snapshot(path, int(meta["step"]), float(meta["t"]), meta["stds"], meta["buffers"]))
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise UserError(f"{path} is not a readable post-hoc EMA snapshot ({e}); delete it and retry") from e
    return sorted(found, key=lambda s: s.step)


def _snapshots_up_to(run_dir: Path, step: int | None) -> list[Snapshot]:
    found = read_snapshots(run_dir)
    if not found:
        from latentpatch.config import load_saved_config
        from latentpatch.runs import CONFIG_FILE

        if (run_dir / CONFIG_FILE).is_file() and not load_saved_config(run_dir / CONFIG_FILE).train.posthoc_stds:
            raise UserError(f"run {run_dir} was trained without post-hoc EMA profiles (train.posthoc_stds is empty); "
                            "train with e.g. train.posthoc_stds=[0.05,0.1] to reconstruct EMAs afterwards")
        raise UserError(f"run {run_dir} has no post-hoc EMA snapshots yet (nothing in "
                        f"{run_dir / POSTHOC_DIR / SNAPSHOT_DIR})")
    chosen = [s for s in found if step is None or s.step <= step]
    if not chosen:
        raise UserError(f"run {run_dir} has no post-hoc EMA snapshot at or before step {step} "
                        f"(the first is at step {found[0].step})")
    return chosen


def reconstruct(run_dir: str | os.PathLike, sigma_rel: float, step: int | None = None
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """The EMA of relative std `sigma_rel` at the last snapshot at or before `step` (default: the last one):
    the state dict, and what was used (step, snapshots, weights). Buffers come from the newest snapshot."""
    run_dir = Path(run_dir)
    gamma_r = std_to_exp(sigma_rel)
    chosen = _snapshots_up_to(run_dir, step)
    terms = [(snap, std) for snap in chosen for std in snap.stds]
    weights = solve_weights([(std_to_exp(std), snap.t) for snap, std in terms], gamma_r, chosen[-1].t)
    last = chosen[-1]
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for i, (snap, std) in enumerate(terms):  # one profile at a time: all snapshots together may not fit in memory
        prefix = profile_prefix(std)
        with safe_open(snap.path, framework="pt") as f:
            for key in (k for k in f.keys() if k.startswith(prefix) and k[len(prefix):] not in last.buffers):
                value = f.get_tensor(key)
                name = key[len(prefix):]
                dtypes[name] = value.dtype
                total[name] = total.get(name, 0) + float(weights[i]) * value.double()
    prefix = profile_prefix(last.stds[0])
    with safe_open(last.path, framework="pt") as f:
        state = {name: f.get_tensor(prefix + name) for name in last.buffers if prefix + name in f.keys()}
    state |= {name: value.to(dtypes[name]) for name, value in total.items()}
    info = {"sigma_rel": float(sigma_rel), "gamma": gamma_r, "step": last.step, "t": last.t,
            "snapshots": [{"step": snap.step, "std": std, "weight": float(w)}
                          for (snap, std), w in zip(terms, weights)]}
    return state, info


def posthoc_checkpoint_name(sigma_rel: float, step: int) -> str:
    return f"std-{sigma_rel:.3f}-{ckpt_io.checkpoint_name(step)}"


def write_posthoc_checkpoint(run_dir: str | os.PathLike, sigma_rel: float, step: int | None = None) -> Path:
    """The reconstruction of `sigma_rel` at `step` as RUN/posthoc/std-0.100-step-XXXXXXXX/, a checkpoint folder
    (ema.safetensors, state.json with what was used under "posthoc") that `load_run(..., checkpoint=it)` and
    `latentpatch sample RUN --checkpoint it` load like any other; it holds no raw weights."""
    run_dir = Path(run_dir)
    state, info = reconstruct(run_dir, sigma_rel, step)
    blob = save_safetensors_bytes({k: v.contiguous() for k, v in state.items()}, metadata={"step": str(info["step"])})
    folder = run_dir / POSTHOC_DIR / posthoc_checkpoint_name(sigma_rel, info["step"])
    return ckpt_io.write_checkpoint_folder(folder, {ckpt_io.WEIGHT_FILES["ema"]: blob},
                                           {"step": info["step"], "posthoc": info}, "no reconstruction was written")
