"""The lab: performance tools (perf/: throughput, op counts, synchronisations, the GPU check) apart from experiments
(experiments/: tuning on validation, the depth diagnosis, the paper's claims, confidence correlation, co-training,
model quality, AES efficiency). Run from the repository root as modules, e.g.
``python -m benchmarks.perf.throughput --help``."""
