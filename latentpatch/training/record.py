"""Writing a run's record: config.yaml and run.json, once every check of the start has passed.

Nothing of a run folder is written before training.resolve has resolved the run and the session has been built
(the checkpoint a resume continues from restored): a refused start leaves the folder exactly as it was.
"""

from __future__ import annotations

import shutil

from latentpatch.checkpoints import CKPT_DIR
from latentpatch.config import save_config
from latentpatch.io import write_json_atomic
from latentpatch.runs import CONFIG_FILE, RUN_FILE
from latentpatch.training.logging import LOG_FILE, truncate_log
from latentpatch.training.posthoc_ema import POSTHOC_DIR
from latentpatch.training.resolve import ResolvedRun


def record_run(run: ResolvedRun, step: int) -> None:
    """Rank 0 writes config.yaml and run.json; a fresh start (or a resume killed before its first checkpoint) also
    clears stale logs, checkpoints and post-hoc snapshots, and a resume cuts the log back to its checkpoint's
    `step`."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    if run.checkpoint is None:
        (run.run_dir / LOG_FILE).unlink(missing_ok=True)
        shutil.rmtree(run.run_dir / CKPT_DIR, ignore_errors=True)
        shutil.rmtree(run.run_dir / POSTHOC_DIR, ignore_errors=True)  # snapshots and reconstructions of that run
    else:
        truncate_log(run.run_dir / LOG_FILE, step)
    save_config(run.cfg, run.run_dir / CONFIG_FILE)
    write_json_atomic(run.run_dir / RUN_FILE, run.info)
