"""Benchmarks of keras_vqpix on this machine: `python -m benchmarks` writes `benchmarks/RESULTS.md`."""
