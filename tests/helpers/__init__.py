"""What several test modules share (test modules import from here, never from each other):

- :mod:`helpers.paths`: the project root and the committed checkpoints;
- :mod:`helpers.configs`: configurations and evaluate.py arguments for quick runs;
- :mod:`helpers.models`: small random models and a hand-made eps model that records its calls;
- :mod:`helpers.simulated_cuda`: a CUDA device simulated on the CPU.
"""
