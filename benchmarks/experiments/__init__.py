"""Experiments: settings chosen on validation splits (tune_val), why deep inversion breaks (depth_diagnosis), the
paper's claims on Fashion-OOD (fashion_claims), how much of the score is the classifier's confidence
(confidence_correlation), what co-training buys (cotrain_digits), the models' quality (model_quality) and what AES
saves (aes_efficiency). Their evaluate.py runs go through :mod:`benchmarks.experiments.common`."""
