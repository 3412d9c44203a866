"""Lightning callbacks of diffguard_pl (installed with the package)."""

from callbacks.curves import InversionCurveLogger
from callbacks.export import ExportPortableCheckpoint
from callbacks.progress import EvalProgress
from callbacks.reconstructions import ReconstructionLogger
from callbacks.score_plots import ScoreDistributionPlot

__all__ = ["EvalProgress", "ExportPortableCheckpoint", "InversionCurveLogger", "ReconstructionLogger", "ScoreDistributionPlot"]
