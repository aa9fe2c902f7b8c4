"""Sampling caches (`--cache`) against the uncached sampler, on a trained run: images/s side by side, and the
quality of the same seeds' samples. Results and how they were run: docs/benchmarks.md, "Sampling caches".

    python -m benchmarks.caching.speed RUN ...     images/s of each arm, interleaved rounds, process CPU time
    python -m benchmarks.caching.quality RUN ...   FID / KID / SWD of each arm's samples, and their distance to
                                                   the uncached samples of the same seeds
    python -m benchmarks.caching.figure ...        the same seeds, uncached and each arm, one row each
"""
