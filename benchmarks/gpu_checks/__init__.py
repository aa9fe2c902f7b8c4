"""The checks of benchmarks/gpu_suite.py, one module per pipeline stage; each `run(ctx)` returns its Rows."""
