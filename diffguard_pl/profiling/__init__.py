"""How fast the machine and the pipeline run: the machine's timings, peak memory and matrix-product rate (machine),
and the pipeline's model calls recorded and replayed on their own, timed and counted in FLOPs (replay).

Above the method and the models, below the jobs: evaluate.py's job describes the machine with it, the performance
tools in benchmarks/perf/ measure the pipeline against its replay."""
