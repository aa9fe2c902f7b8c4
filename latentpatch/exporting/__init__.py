"""The export stage: a run folder -> a diffusers pipeline folder (`exporter.export`, `lp.export`).

`exporter` checks and stages the folder, `coordinate_pipeline` writes the one target today (a custom pipeline
that adds the coordinate grid; a base whose weights stay stock gets its own stock-pipeline target beside it),
from the parts: `network` (the denoiser as a diffusers model), `schedulers`, `text`, `autoencoder`, `lora`,
and `model_card`; `shipped/` holds the code the folder carries."""
