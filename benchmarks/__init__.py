"""latentpatch's benchmarks: one package per thing measured, each command a module run from the repository root.

    python -m benchmarks.speed.to_quality ...      speed to quality: patch against full-size training
    python -m benchmarks.speed.guard_defaults ...  the checkpoint the small-store guard makes `sample` load
    python -m benchmarks.speed.crop_cost ...       what a crop step costs against the latent size (DiTs)
    python -m benchmarks.throughput.train_step ... the trainer's step against a plain loop and diffusers' DiT
    python -m benchmarks.throughput.encode ...     the encode pipeline against a plain `vae.encode` loop
    python -m benchmarks.throughput.encode_text .. encode with captions: text tower rows and CPU time
    python -m benchmarks.throughput.sample ...     the sample pipeline against a plain sampler loop
    python -m benchmarks.shapes.aspect_buckets ... aspect buckets against centre cropping
    python -m benchmarks.caching.speed ...         sampling caches (--cache): images/s against the uncached sampler
    python -m benchmarks.caching.quality ...       sampling caches: FID/KID/SWD and distance to uncached samples
    python -m benchmarks.caching.figure ...        sampling caches: the same seeds, a row per arm
    python -m benchmarks.throughput.flow_crop_cost  a crop step against a full one, SD3- and FLUX-shaped
    python -m benchmarks.finetune.dit_channels ... DiT bases: the position table alone or coordinate channels too
    python -m benchmarks.finetune.sdxl_channels .. SDXL bases: the time ids alone or coordinate channels too
    python -m benchmarks.gpu.suite ...             every GPU figure in one prepared command

Not part of the installed `latentpatch` package; results and how they were run: docs/benchmarks.md.
"""
