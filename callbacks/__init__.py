"""Lightning callbacks of diffguard_pl (installed with the package)."""

from callbacks.export import ExportPortableCheckpoint

__all__ = ["ExportPortableCheckpoint"]
