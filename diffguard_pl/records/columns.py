"""Every column of the per-sample records, declared once: its name, meaning, unit and sign.

A record is one evaluated sample; the records of a run are columns (a dict of equal-length lists). Three kinds
of column exist, and nothing else:

- meta columns (:data:`META`): who the sample is and what the method did with it (not detectors);
- detector columns, higher = more OOD: DiffGuard with each distance (``diffguard/<distance>``, and
  ``diffguard/<distance>@input`` with the unguided reference), ``diffguard`` (the configured distance), each
  classifier and diffusion detector by its registry name, fusions of two or more of these (``a+b``, e.g.
  ``diffguard+vim`` or ``ddpm_ood+vim``), and DiffGuard's under an oracle's labels (``oracle-<mode>/<detector>``);
- per-step curves (``curve/<metric>``) and a diffusion detector's per-sample statistics before its fitted head
  (``stats/<detector>/<kind>``, e.g. DDPM-OOD's error per start level), kept with the records (the plots, the
  report's derived scores), never in ``scores.csv``.

Only this module writes these names; the functions below build and read them, :func:`describe_column` says
what each holds (``columns.json`` and W&B read it), and :func:`check_columns` refuses a column no rule knows, so
a new column cannot silently become a "detector" with an AUROC. A pure declaration: it imports only the
detector registry, so the config schema may read it.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence

from diffguard_pl.detectors import registry


class Meta(NamedTuple):
    meaning: str
    unit: Optional[str] = None


ID, SET, SPLIT, LABEL, PRED = "id", "set", "split", "label", "pred"
SYNTHESIS_PRED, REFERENCE_PRED, ROUND_TRIP_PSNR = "synthesis_pred", "reference_pred", "round_trip_psnr"
DEPTH, UNET_EVALS = "depth", "unet_evals"

META: Dict[str, Meta] = {
    ID: Meta("the sample's stable id"),
    SET: Meta("ind or the OOD set's name"),
    SPLIT: Meta("val or test: metrics use the evaluated split (test unless split=val), the fused detectors' "
                "normalisation InD val"),
    LABEL: Meta("the InD class (its position in data.ind_classes); -1 for OOD samples", "class index"),
    PRED: Meta("the classifier's prediction on the input: the label that guides the synthesis", "class index"),
    SYNTHESIS_PRED: Meta("the classifier's prediction on the guided synthesis", "class index"),
    REFERENCE_PRED: Meta("the classifier's prediction on the unguided reconstruction (diffguard.reference=unguided)",
                         "class index"),
    ROUND_TRIP_PSNR: Meta("PSNR of the unguided reconstruction against the input: how well the walk returns "
                          "without guidance (diffguard.reference=unguided; higher = closer)", "dB"),
    DEPTH: Meta("inversion steps taken (adaptive early stop ends some early; diffguard.depth is the most)", "steps"),
    UNET_EVALS: Meta("denoiser evaluations spent on the sample", "evaluations"),
}


class Distance(NamedTuple):
    symbol: str  # what a plot's label calls it
    meaning: str
    unit: str
    suffix: str = ""  # after a value in a label


# Every DiffGuard distance (diffguard_pl/method/scores.py computes them), oriented like every score:
# higher = more OOD. diffguard.distances and diffguard.score choose among these names.
DISTANCES: Dict[str, Distance] = {
    "l1": Distance("L1", "mean absolute pixel difference", "intensity on [0, 1]"),
    "l2": Distance("L2", "mean squared pixel difference", "squared intensity on [0, 1]"),
    "psnr": Distance("-PSNR", "minus the PSNR (peak 1)", "dB, negated: -30 is a PSNR of 30 dB", " dB"),
    "ssim": Distance("1 - SSIM", "one minus SSIM (Gaussian window 11, sigma 1.5)", "unitless, 0 = identical"),
    "logit_l1": Distance("logit L1", "mean absolute difference of the classifier's logits", "logits"),
    "feature_cos": Distance("1 - cos", "one minus the cosine similarity of the classifier's penultimate features",
                            "unitless, 0 to 2"),
    "contrastive": Distance("1 - cos (contrastive)", "one minus the cosine similarity of the contrastive "
                            "encoder's features (models.encoder)", "unitless, 0 to 2"),
    "dists": Distance("DISTS", "DISTS distance (piq)", "unitless, 0 = identical"),
    "lpips": Distance("LPIPS", "LPIPS distance (piq)", "unitless, 0 = identical"),
}

DIFFGUARD = "diffguard"  # the configured distance (diffguard.score)
ORACLE_PREFIX = "oracle-"  # oracle-<mode>/<detector>
AGAINST_INPUT = "@input"  # diffguard/<distance>@input: the synthesis against the input, with reference=unguided
FUSED_SEPARATOR = "+"  # a+b: the detectors' z-scores summed (diffguard+<detector>, <detector>+<detector>, ...)
CURVE_PREFIX = "curve/"  # curve/<metric>: a sample's per-step inversion quality
STATS_PREFIX = "stats/"  # stats/<diffusion detector>/<kind>: a list per sample, what its fitted head reads
MORE_OOD = "higher = more OOD"
REFERENCES = {"input": "the input", "unguided": "the unguided reconstruction (from the same latent)"}


def distance_column(distance: str, against_input: bool = False) -> str:
    """The column of DiffGuard with one distance (``against_input``: the synthesis against the input in a run
    whose reference is the unguided reconstruction)."""
    return f"{DIFFGUARD}/{distance}{AGAINST_INPUT if against_input else ''}"


def fused_column(partner: str) -> str:
    """The column of DiffGuard fused with another detector (or a fusion of detectors: ``ddpm_ood+vim``)."""
    return f"{DIFFGUARD}{FUSED_SEPARATOR}{partner}"


def fusion_column(parts: Sequence[str]) -> str:
    """The column of the fusion of ``parts`` (two or more detector names, in the given order)."""
    return FUSED_SEPARATOR.join(parts)


def reported_detectors(classifier_detectors: Sequence[str], diffusion_detectors: Sequence[str],
                       partners: Sequence[str]) -> List[str]:
    """The headline detectors an evaluation with these detectors and fusion partners reports: ``diffguard``, each
    classifier and diffusion detector it runs, ``diffguard+X`` for each partner X and a partner of several
    detectors also on its own (``a+b``; diffguard_pl/detectors/fused.py derives the fused ones)."""
    fused = [fused_column(p) for p in partners] + [p for p in partners if FUSED_SEPARATOR in p]
    return list(dict.fromkeys([DIFFGUARD, *classifier_detectors, *diffusion_detectors, *fused]))


def fusion_parts(column: str) -> Optional[List[str]]:
    """The detectors a fused column sums, in order: each ``diffguard`` or a registry detector; None for any other
    column."""
    parts = column.split(FUSED_SEPARATOR)
    if len(parts) < 2 or len(set(parts)) < len(parts):
        return None
    known = all(p == DIFFGUARD or registry.is_classifier_detector(p) or registry.is_diffusion_detector(p)
                for p in parts)
    return parts if known else None


def stats_column(detector: str, kind: str) -> str:
    return f"{STATS_PREFIX}{detector}/{kind}"


def stats_of(column: str) -> Optional[tuple]:
    """(detector, kind) of a ``stats/<detector>/<kind>`` column of a diffusion detector; None for any other."""
    if not column.startswith(STATS_PREFIX) or column.count("/") != 2:
        return None
    detector, kind = column[len(STATS_PREFIX):].split("/")
    return (detector, kind) if registry.is_diffusion_detector(detector) and kind else None


def is_list_column(column: str) -> bool:
    """A column holding a list per sample (curves, statistics): kept in records/, never in scores.csv."""
    return bool(curve_metric(column) or stats_of(column))


def fused_partner(column: str) -> Optional[str]:
    """The detector a fused column combines with DiffGuard; None for any other column."""
    prefix = DIFFGUARD + FUSED_SEPARATOR
    return column[len(prefix):] if column.startswith(prefix) else None


def oracle_column(mode: str, detector: str) -> str:
    """The column of a detector's oracle variant."""
    return f"{ORACLE_PREFIX}{mode}/{detector}"


def oracle_prefixes(columns) -> List[str]:
    """``""`` and every ``oracle-<mode>/`` prefix present among ``columns``: the label sources of a run."""
    return [""] + sorted({c.split("/")[0] + "/" for c in columns if c.startswith(ORACLE_PREFIX)})


def curve_column(metric: str) -> str:
    return CURVE_PREFIX + metric


def curve_metric(column: str) -> Optional[str]:
    """The metric of a ``curve/<metric>`` column; None for any other column."""
    return column[len(CURVE_PREFIX):] if column.startswith(CURVE_PREFIX) else None


def describe_column(column: str, score: Optional[str] = None, reference: Optional[str] = None) -> dict:
    """What a column holds: ``{"meaning", "unit", "direction"}`` (direction None for meta columns and curves).

    ``score`` (diffguard.score) and ``reference`` (diffguard.reference) make the DiffGuard entries concrete;
    without them they name the config keys. A column no rule knows gets meaning None.
    """
    if column in META:
        meaning, unit = META[column]
        return {"meaning": meaning, "unit": unit, "direction": None}
    if curve_metric(column):
        return {"meaning": f"the sample's {curve_metric(column)} after each inversion step", "unit": None,
                "direction": None}
    if stats_of(column):
        detector, kind = stats_of(column)
        return {"meaning": f"{detector}'s per-sample {kind} statistics, before its fitted head", "unit": None,
                "direction": None}
    if column.startswith(ORACLE_PREFIX) and "/" in column:
        mode, detector = column[len(ORACLE_PREFIX):].split("/", 1)
        entry = describe_column(detector, score, reference)
        if entry["meaning"] is not None:
            entry["meaning"] += f"; the synthesis guided by the {mode} oracle's label, not the prediction"
        return entry
    if registry.is_classifier_detector(column):
        entry = registry.classifier_detector(column)
        return {"meaning": f"classifier detector: {entry.meaning}", "unit": entry.unit, "direction": MORE_OOD}
    if registry.is_diffusion_detector(column):
        entry = registry.diffusion_detector(column)
        return {"meaning": f"diffusion detector: {entry.meaning}", "unit": entry.unit, "direction": MORE_OOD}
    if column == DIFFGUARD:
        if not score:
            return {"meaning": "DiffGuard's score: the values of diffguard/<diffguard.score in config.yaml>",
                    "unit": "that column's", "direction": MORE_OOD}
        entry = describe_column(distance_column(score), score, reference)
        return {**entry, "meaning": f"DiffGuard's score, the values of {distance_column(score)}: {entry['meaning']}"}
    if fusion_parts(column):
        return {"meaning": f"the fusion of {', '.join(fusion_parts(column))}: the sum of their z-scores, each "
                           f"normalised on the InD validation split", "unit": "z-score sum, unitless",
                "direction": MORE_OOD}
    if column.startswith(DIFFGUARD + "/"):
        distance = column[len(DIFFGUARD) + 1:]
        against_input = distance.endswith(AGAINST_INPUT)
        distance = distance.removesuffix(AGAINST_INPUT)
        if distance not in DISTANCES:
            return {"meaning": None, "unit": None, "direction": None}
        if against_input:
            versus = "the input (this run's reference is the unguided reconstruction; what reference=input scores)"
        else:
            versus = REFERENCES.get(reference, "the reference (diffguard.reference)")
        return {"meaning": f"{DISTANCES[distance].meaning} between the guided synthesis and {versus}",
                "unit": DISTANCES[distance].unit, "direction": MORE_OOD}
    return {"meaning": None, "unit": None, "direction": None}


def is_detector(column: str) -> bool:
    """A column of scores (higher = more OOD): every column but the meta columns and the curves."""
    return describe_column(column)["direction"] == MORE_OOD


def detector_columns(records: Mapping[str, list]) -> List[str]:
    return [c for c in records if is_detector(c)]


def check_columns(columns: Sequence[str]) -> None:
    """ValueError naming any column this module does not declare (a new column must be declared here first)."""
    unknown = [c for c in columns if c not in META and not is_list_column(c) and not is_detector(c)]
    if unknown:
        raise ValueError(f"record columns {unknown} are declared nowhere: add them to "
                         f"diffguard_pl/records/columns.py (META, or a detector's naming rule)")


def column_dictionary(columns: Sequence[str], score: Optional[str] = None,
                      reference: Optional[str] = None) -> Dict[str, dict]:
    """:func:`describe_column` of every column, in order (what ``columns.json`` holds)."""
    return {c: describe_column(c, score, reference) for c in columns}
