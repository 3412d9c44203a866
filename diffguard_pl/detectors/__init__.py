"""Detectors and their numbers: every detector's name, needs, grid and paper (registry); the classifier detectors
built on a classifier (classifier_parts), fitted and tuned on validation splits (tuning) for an evaluation
(fitting), on features cached on disk (features) and cached there themselves (detector_cache), our KNN and ViM
(baselines); DiffGuard's derived and fused detectors (fused); OOD metrics (metrics), bootstrap intervals
(bootstrap) and results.json / scores.csv (results)."""
