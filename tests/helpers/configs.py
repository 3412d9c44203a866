"""Configurations for quick runs: evaluate.py arguments and the classifier-free pipeline's config."""

from diffguard_pl.config import ClassifierFreeConfig, DiffGuardConfig, GuidanceConfig

from helpers.paths import ROOT


def eval_argv(out, models, *extra):
    """evaluate.py arguments for a quick run on a slice of the embedded benchmark with ``models``. The small
    models are random, their classifier at chance on the benchmark: allowed (the classifier check,
    diffguard_pl/detectors/classifier_check.py, would refuse it; ``models.allow_classifier_mismatch=false`` in
    ``extra`` restores it)."""
    return [f"--config={ROOT / 'conf' / 'digits_gdm.yaml'}", f"output_dir={out}",
            f"models.classifier={models / 'classifier'}", f"models.diffusion={models / 'diffusion'}",
            "limit_per_set=6", "diffguard.num_steps=4", "diffguard.depth=2", "data.eval_batch_size=16",
            "trainer.enable_progress_bar=false", "models.allow_classifier_mismatch=true", *extra]


def classifier_free_config(omega=3.0, dsg=True, num_steps=8, depth=4, **kw):
    """A pipeline config with classifier-free guidance (DSG on by default) and a short walk."""
    return DiffGuardConfig(num_steps=num_steps, depth=depth,
                           guidance=GuidanceConfig(mode="classifier_free",
                                                   classifier_free=ClassifierFreeConfig(omega=omega, dsg=dsg)), **kw)
