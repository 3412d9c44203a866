"""Detectors and their numbers: the classifier baselines (baselines), fused and derived detectors (fused),
OOD metrics (metrics), bootstrap intervals (bootstrap) and results.json / scores.csv (results)."""
