"""benchmarks.caching: each run gets the arms whose method fits its network, and the paired distance is 0 for the
same images and the mean 8-bit difference otherwise."""

from __future__ import annotations

import json
import math

import pytest
import torch
from export_helpers import TINY_UNET, write_run

from benchmarks.caching.arms import ARMS, arms_for
from benchmarks.caching.quality import paired_distance
from latentpatch.config import load_config
from latentpatch.errors import UserError
from latentpatch.runs import load_run
from latentpatch.sampling import job_folder


def test_a_run_gets_the_arms_of_its_network_uncached_first(tiny_run, tmp_path):
    dit = load_run(tiny_run, device="cpu")
    unet = load_run(write_run(tmp_path / "unet", load_config(None, TINY_UNET), [3, 8, 8]), device="cpu")
    assert list(arms_for(dit, None)) == ["uncached"] + [a for a in ARMS if a.startswith(("step", "ras"))]
    # a 2-level UNet has nothing below level 1 to reuse: that arm is left out
    assert list(arms_for(unet, None)) == ["uncached"] + [a for a in ARMS if a.startswith("deepcache")
                                                         and not a.endswith("l1")]
    assert arms_for(dit, ["step i3"]) == {"uncached": None, "step i3": ARMS["step i3"]}
    with pytest.raises(UserError, match="^--cache deepcache is for UNets"):
        arms_for(dit, ["deepcache i3"])  # asked for by name: refused, not dropped


def test_paired_distance_is_the_mean_8_bit_difference_and_its_psnr(tmp_path):
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    for name, offset in (("a", 0), ("b", 0), ("c", 3)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "job.json").write_text(json.dumps({"images": [{"index": 0}, {"index": 1}]}))
        for i in range(2):
            job_folder.write_png(job_folder.image_path(folder, i), images[i] + offset, {})
    assert paired_distance(tmp_path / "a", tmp_path / "b") == {"mean_abs_8bit": 0.0, "psnr_db": math.inf}
    distance = paired_distance(tmp_path / "c", tmp_path / "a")
    assert distance["mean_abs_8bit"] == pytest.approx(3.0)
    assert distance["psnr_db"] == pytest.approx(10 * math.log10(255**2 / 9))
