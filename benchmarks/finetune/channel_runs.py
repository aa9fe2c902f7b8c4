"""The runs of the channels experiments (a DiT base, dit_channels.py; an SDXL base, sdxl_channels.py), each in its
own single-threaded process: the base's pretraining and the fine-tunes of the two arms (the same base function, the
same settings and seeds; only the first layer's inputs differ). A run records its process CPU seconds in cpu.json; a
finished run is kept.

    python -m benchmarks.finetune.channel_runs ARM SEED OUT CONFIG.json     (what the experiment launches)
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..one_thread import run_python, side_by_side

EXPERIMENTS = {
    "dit": {
        "table": "positions from the sin-cos table alone: the DiT stays stock (in_channels C)",
        "channels": "the table and two zero-initialised coordinate channels on the patch embedding (in_channels C+2)",
    },
    "sdxl": {
        "time-ids": "the crop's place in SDXL's time ids alone: the UNet stays stock (in_channels C)",
        "channels": "the time ids and two zero-initialised coordinate channels on conv_in (in_channels C+2)",
    },
}


@dataclass(frozen=True)
class Pretraining:
    """The base's pretraining, fixed before running."""

    steps: int
    batch_size: int
    lr: float
    eval_every: int
    warmup_steps: int = 300  # given, so a run continued to more steps (resume) is the longer run exactly

    def run(self, base: Path, stores: dict[str, Path], out: Path, overrides: list[str]) -> Path:
        """The random pipeline `base` trained by lp.finetune on stores["base-train"] into `out`: held-out loss on
        128 of stores["base-heldout"] every eval_every steps, no early stop; `overrides` are the base's own (its
        patch schedule, caption dropout, text length). A run already in `out` (killed, or planned shorter) is
        continued: resume is exact."""
        import latentpatch as lp

        lp.finetune(base, stores["base-train"], out, steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                    overrides=[f"heldout.latents={stores['base-heldout']}", f"heldout.every={self.eval_every}",
                               "heldout.limit=128", "train.patience=0", "model.attention=sdpa",
                               f"train.log_every={self.eval_every}", f"optim.warmup_steps={self.warmup_steps}",
                               *overrides],
                    resume=(out / "config.yaml").is_file(), device="cpu", progress=False)
        return out


@dataclass(frozen=True)
class FinetunePlan:
    """Fixed before running: the same for every arm and seed."""

    steps: int
    batch_size: int
    lr: float
    eval_every: int
    heldout_limit: int


def finetune_overrides(plan: FinetunePlan, heldout: Path, seed: int, experiment: str) -> list[str]:
    """Both arms start from a run folder (the base, or its widened copy), whose config they inherit; every setting
    that decides the fine-tune is set here, the same for both: the library's default patch schedule (half-side
    crops in half the steps, batch doubled), per-axis coordinates (what a DiT or SDXL base gets) and for a DiT
    aligned crops, the held-out set every eval_every steps, no early stop."""
    aligned = ["patches.aligned=true"] if experiment == "dit" else []  # a UNet has no token grid to align to
    return ["patches.real_p=0.5", "patches.sizes=[0.5]", "patches.batch_growth=2.0", *aligned,
            "patches.coordinate_scale=per-axis", f"heldout.latents={heldout}", f"heldout.every={plan.eval_every}",
            f"heldout.limit={plan.heldout_limit}", "train.patience=0", f"train.seed={seed}",
            f"train.log_every={plan.eval_every}", "train.label_dropout=0.1", "model.attention=sdpa"]


def run_one(arm: str, seed: int, out: Path, config: dict) -> None:
    """One fine-tune (an arm of config["experiment"]) or the pretraining (arm "base"), one thread, CPU time
    recorded."""
    import torch

    import latentpatch as lp

    from . import dit_base, sdxl_base

    torch.set_num_threads(1)
    start = time.process_time()
    experiment = config["experiment"]
    stores = {k: Path(v) for k, v in config["stores"].items()}
    if arm == "base":
        made = {"dit": dit_base, "sdxl": sdxl_base}[experiment]
        made.pretrain(Path(config["random_base"]), stores, out, Pretraining(**config["pretraining"]))
    else:
        plan = FinetunePlan(**config["finetune"])
        base = config["bases"][arm]
        lp.finetune(base, stores["new-train"], out, steps=plan.steps, lr=plan.lr, batch_size=plan.batch_size,
                    overrides=finetune_overrides(plan, stores["new-heldout"], seed, experiment), device="cpu",
                    progress=False)
    before = json.loads((out / "cpu.json").read_text())["process_cpu_s"] if (out / "cpu.json").is_file() else 0.0
    (out / "cpu.json").write_text(json.dumps({"process_cpu_s": before + time.process_time() - start}) + "\n")
    (out / "done").write_text("")


def launch(jobs: list[tuple[str, int, Path]], config: dict, workers: int) -> None:
    """Each (arm, seed, out) not yet done in its own process (`workers` at once), one thread each."""
    def one(job: tuple[str, int, Path]) -> None:
        arm, seed, out = job
        if (out / "done").is_file():
            return
        if arm != "base":  # a killed fine-tune starts again; the base continues (pretrain resumes it)
            shutil.rmtree(out, ignore_errors=True)
        run_python(["-m", "benchmarks.finetune.channel_runs", arm, str(seed), str(out), json.dumps(config)],
                   f"{arm} seed {seed}")

    side_by_side(one, jobs, workers)


if __name__ == "__main__":
    run_one(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4]))
