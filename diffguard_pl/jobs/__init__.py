"""The jobs behind the entry points: evaluation (eval_job with records, plan, folder, merge),
training (train_job), AES calibration (calibration), the class-conditional sample check (sample_check), and the
Lightning set-up they share (lightning_setup). The machine's speed is measured in diffguard_pl.profiling."""
