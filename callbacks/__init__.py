"""Lightning callbacks of diffguard_pl (installed with the package)."""

from diffguard_pl.callbacks.curves import InversionCurveLogger
from diffguard_pl.callbacks.export import ExportPortableCheckpoint
from diffguard_pl.callbacks.progress import EvalProgress
from diffguard_pl.callbacks.reconstructions import ReconstructionLogger
from diffguard_pl.callbacks.score_plots import ScoreDistributionPlot

__all__ = ["EvalProgress", "ExportPortableCheckpoint", "InversionCurveLogger", "ReconstructionLogger", "ScoreDistributionPlot"]
