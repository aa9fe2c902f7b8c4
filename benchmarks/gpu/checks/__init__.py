"""The checks of benchmarks.gpu.suite, one module per pipeline stage; each `run(ctx)` returns its Rows."""
