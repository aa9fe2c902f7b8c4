"""The sample stage: `options` (SampleOptions: its settings, defaults and checks), `shape` (the size a job samples
at, checked against the run), `latents` (a denoiser's full-size latents on the coordinate grid), `generate` (jobs
of images from a run: `lp.sample`), `job_folder` (the resumable folder a job writes) and `prompts` (prompt files)."""
