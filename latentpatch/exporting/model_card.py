"""What an export is, recorded beside it: export.json (the record) and README.md (the model card made from it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import latentpatch
from latentpatch import checkpoints as ckpt
from latentpatch.runs import LoadedRun

RECORD_FILE = "export.json"
CARD_FILE = "README.md"


def _shown(source: str | None) -> str | None:
    """A hub id or builtin name as it is; a local folder by its last two parts (a card is for others to read)."""
    if source is None or not Path(source).is_absolute():
        return source
    return "…/" + "/".join(Path(source).parts[-2:])


def _which_checkpoint(loaded: LoadedRun) -> str:
    found = Path(loaded.checkpoint).resolve()
    best, latest = ckpt.best_checkpoint(loaded.run_dir), ckpt.latest_checkpoint(loaded.run_dir)
    if best is not None and found == best.resolve():
        return "BEST (the lowest held-out loss)"
    if latest is not None and found == latest.resolve():
        return "latest"
    return "post-hoc EMA reconstruction" if "posthoc" in ckpt.read_state(found) else "named"


def heldout_loss(loaded: LoadedRun) -> dict[str, Any] | None:
    """The held-out loss the training log recorded at the checkpoint's step (None: not evaluated there)."""
    from latentpatch.training.logging import LOG_FILE, read_log

    if "posthoc" in ckpt.read_state(Path(loaded.checkpoint)):
        return None  # a reconstruction was never evaluated by training (`latentpatch ema --score` scores it)
    for record in reversed(read_log(loaded.run_dir / LOG_FILE)):
        if record.get("step") == loaded.step and "heldout_loss" in record:
            return {"loss": float(record["heldout_loss"]), "step": loaded.step}
    return None


def _base(loaded: LoadedRun) -> str:
    """What the network was before this run: a fine-tune's base (finetune.json), else trained here."""
    path = loaded.run_dir / "finetune.json"
    if path.is_file():
        try:
            base = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            base = {}
        return f"fine-tune of {_shown(str(base.get('base', '?')))} ({base.get('kind', '?')})"
    model = loaded.cfg.model
    name = {"dit": "DiT", "unet": "UNet"}.get(model.arch) or model.pretrained.class_name
    return f"{name} trained from scratch by latentpatch"


def export_record(loaded: LoadedRun, written: dict[str, Any]) -> dict[str, Any]:
    """The record of an export: the run, its data, the checkpoint and its held-out loss, what was written."""
    info, spec = loaded.info, loaded.spec
    text = spec.text_encoder
    return {
        "exported_by": f"latentpatch {latentpatch.__version__}",
        "run": loaded.run_dir.resolve().name,
        "run_latentpatch_version": info.get("latentpatch_version"),
        "base": _base(loaded),
        "objective": _objective(loaded),
        "data": {"images": (info.get("store") or {}).get("images"), "resolution": info.get("resolution"),
                 "latent_shape": info.get("latent_shape"),
                 "autoencoder": _shown((info.get("autoencoder") or {}).get("source"))},
        "checkpoint": {"name": Path(loaded.checkpoint).name, "which": _which_checkpoint(loaded),
                       "weights": loaded.weights, "step": loaded.step, "sha256_16": loaded.checkpoint_id},
        "heldout_loss": heldout_loss(loaded),
        "conditioning": {"classes": spec.num_classes,
                         "text_encoder": None if text is None else {k: text.get(k) for k in
                                                                     ("model", "pretrained", "layer", "padding")}},
        **written,
    }


def _objective(loaded: LoadedRun) -> str:
    edm = loaded.cfg.edm
    if edm.precond == "flow":
        return f"the base's own flow matching ({loaded.cfg.flow.weighting_scheme} noise levels)"
    if edm.precond == "vp":
        loss = ", DDPM loss" if loaded.cfg.vp.objective == "ddpm" else ""
        return f"the base's own VP ({(edm.scheduler or {}).get('prediction_type', 'epsilon')}{loss})"
    return "EDM"


def render_card(record: dict[str, Any]) -> str:
    """README.md: front matter for the Hugging Face hub, the record as a table, how to load the folder."""
    held = record["heldout_loss"]
    ck = record["checkpoint"]
    rows = [
        ("base", record["base"]), ("objective", record["objective"]),
        ("data", f"{record['data']['images']} images at {record['data']['resolution']} px "
                 f"(latents {record['data']['latent_shape']}, autoencoder {record['data']['autoencoder']})"),
        ("steps", ck["step"]), ("checkpoint", f"{ck['name']} ({ck['which']}, {ck['weights']} weights, "
                                              f"sha256 {ck['sha256_16']}…)"),
        ("held-out loss", "not evaluated at this checkpoint" if held is None else f"{held['loss']:.4f}"),
        ("network", record["network"]), ("scheduler", record["scheduler"]), ("LoRA", record["lora"] or "none"),
        ("coordinates", record["coordinate_scale"]), ("exported by", record["exported_by"]),
        ("trained with", f"latentpatch {record['run_latentpatch_version']}"),
    ]
    call = record["example_call"]
    lora = ""
    if record["lora"] == "separate":
        lora = (f'pipe.load_lora_weights("{record["folder"]}/lora")   # the adapters; without them: the base\n')
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    if record.get("stock"):
        return _stock_card(record, table, lora)
    imports, loader = record["load"]
    return f"""---
library_name: diffusers
tags: [latentpatch, patch-diffusion, diffusers]
---

# {record['run']}

{record['about']}

| | |
|---|---|
{table}

## Use

```python
import torch
{imports}

pipe = {loader.format(folder=record['folder'])}
{lora}images = pipe({call}, num_inference_steps=18, generator=torch.Generator().manual_seed(0)).images
```

`latentpatch sample` gives the same image i when image i's generator is seeded with
`latentpatch.seeding.image_seed(seed, i)` (`generator=[...]`, one per image).
"""


def _stock_card(record: dict[str, Any], table: str, lora: str) -> str:
    """The card of a base's own pipeline folder: no remote code, the stock class."""
    return f"""---
library_name: diffusers
tags: [latentpatch, patch-diffusion, diffusers]
---

# {record['run']}

Fine-tuned with Patch Diffusion by latentpatch: every crop was told its place through the base's own position
encoding (SDXL: its crop conditioning), so the network's weights are stock and this is a plain
`{record['pipeline']}` folder.

| | |
|---|---|
{table}

## Use

```python
import torch
{record['load'][0]}

pipe = {record['load'][1].format(folder=record['folder'])}
{lora}images = pipe({record['example_call']}, generator=torch.Generator().manual_seed(0)).images
```

`latentpatch sample --sampler {record['sampler'].split()[0]}` samples the same schedule: image i is the pipeline's
for the initial latents latentpatch draws with `latentpatch.seeding.image_seed(seed, i)`.
""" + _cache_section(record)


def _cache_section(record: dict[str, Any]) -> str:
    """How to sample faster in the folder's own pipeline, where latentpatch's step cache runs there."""
    if not record.get("cache_call"):
        return ""
    return f"""
## Faster sampling

The step cache of `latentpatch sample --cache step` (diffusers' TaylorSeer hook on the blocks' attention and
feed-forwards, refreshed every third call after three full ones) runs in this pipeline as well, with the same
images:

```python
from diffusers import TaylorSeerCacheConfig

{record['cache_call']}
```
"""


def write_model_card(folder: Path, record: dict[str, Any]) -> None:
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    (folder / CARD_FILE).write_text(render_card(record))
