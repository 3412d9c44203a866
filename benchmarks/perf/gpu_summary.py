"""The verdicts of a benchmarks/perf/gpu_check.sh run against the throughput issue's targets, as a Markdown table.

    python -m benchmarks.perf.gpu_summary OUT [--strict]

Reads the JSON files that gpu_check.sh leaves in OUT (a part that failed or ran out of time has none and
is reported as "not run") and prints one row per check: what was measured, the target and the verdict.
Targets: overhead ratio <= 1.10 on every path; the released ImageNet GDM settings (ADM-256 + ResNet-50,
bf16) >= 1 image/s on an H100; DiT-XL/2 classifier-free guidance + DSG >= 15 images/s; host-device synchronisations per
batch constant in the depth; fp32 and bf16 AUROC within 0.5 points. ``--strict`` exits 1 when a check
fails or did not run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

MAX_RATIO = 1.10
GDM_IMAGES_PER_S = 1.0
DIT_IMAGES_PER_S = 15.0
MAX_AUROC_GAP = 0.005  # AUROC as a fraction: 0.5 points

Row = Tuple[str, str, str, str]  # check, measured, target, verdict


def _load(folder: Path, name: str) -> Optional[dict]:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def _verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def throughput_rows(report: Optional[dict], label: str, min_images_per_s: Optional[float] = None,
                    paths: Optional[List[str]] = None) -> List[Row]:
    """Overhead ratio (and images/s where a target is given) per path of one benchmarks.perf.throughput report."""
    if report is None:
        return [(label, "-", f"ratio <= {MAX_RATIO}", "not run")]
    rows: List[Row] = []
    device = report.get("device", "?")
    tiny = bool(report.get("tiny_arch"))  # the smoke test's shrunken architectures: speed targets do not apply
    if tiny:
        label += " (tiny arch)"
    for name, path in report["paths"].items():
        if paths is not None and name not in paths:
            continue
        where = f"{label} [{name}], {device}, batch {path['batch_size']}"
        ratio = path["overhead_ratio"]
        floor = path.get("pipeline_fraction_of_floor")
        extra = f", {100 * floor:.0f}% of the floor" if floor is not None else ""
        rows.append((f"{where}: overhead", f"{ratio:.3f} ({path['images_per_second']:.2f} images/s{extra})",
                     f"<= {MAX_RATIO}", _verdict(ratio <= MAX_RATIO)))
        if min_images_per_s is not None:
            speed = path["images_per_second"]
            verdict = _verdict(speed >= min_images_per_s)
            if tiny:
                verdict = "-"
            elif min_images_per_s == GDM_IMAGES_PER_S and "H100" not in device:
                verdict += " (target stated for an H100)"
            rows.append((f"{where}: speed", f"{speed:.2f} images/s", f">= {min_images_per_s:g}", verdict))
    for batch, entry in (report.get("scaling") or {}).items():
        rows.append((f"{label} scaling, batch {batch}", f"{entry['images_per_second']:.2f} images/s, "
                     f"ratio {entry['overhead_ratio']:.3f}", "(report)", "-"))
    return rows


def sync_rows(report: Optional[dict]) -> List[Row]:
    if report is None:
        return [("synchronisations per batch", "-", "constant in the depth", "not run")]
    rows = []
    for name, entry in report.items():
        counts = ", ".join(f"depth {d}: {c}" for d, c in entry["syncs_by_depth"].items())
        if entry["must_stay_constant"]:
            rows.append((f"synchronisations [{name}]", counts, "constant in the depth", _verdict(not entry["grows"])))
        else:
            rows.append((f"synchronisations [{name}]", counts, "(grows by design: AES)", "-"))
    return rows


def auroc_rows(report: Optional[dict]) -> List[Row]:
    if report is None:
        return [("fp32 vs bf16 AUROC", "-", f"within {100 * MAX_AUROC_GAP:g} points", "not run")]
    rows = []
    for name in ("diffguard", "diffguard+ebo"):
        values = report["detectors"].get(name)
        if values is None:
            continue
        pairs = [values[key] for key in ("near_auroc", "far_auroc") if None not in values[key]]
        gap = max(abs(a - b) for a, b in pairs)
        shown = "; ".join(f"{g} {100 * a:.2f} / {100 * b:.2f}" for g, (a, b) in zip(("near", "far"), pairs))
        rows.append((f"fp32 / bf16 AUROC [{name}]", shown, f"gap <= {100 * MAX_AUROC_GAP:g} points",
                     _verdict(gap <= MAX_AUROC_GAP)))
    rows.append(("fp32 / bf16 predictions", f"{report['same_prediction']} of {report['samples']} equal", "(report)",
                 "-"))
    return rows


def summarize(folder: Path) -> List[Row]:
    rows: List[Row] = []
    rows += throughput_rows(_load(folder, "embedded_fp32.json"), "embedded fp32")
    rows += throughput_rows(_load(folder, "embedded_bf16.json"), "embedded bf16")
    rows += throughput_rows(_load(folder, "paper_gdm_bf16.json"), "ADM-256 GDM bf16 channels-last",
                            GDM_IMAGES_PER_S, ["gdm"])
    rows += throughput_rows(_load(folder, "paper_dit_bf16.json"), "DiT-XL/2 classifier-free+DSG bf16",
                            DIT_IMAGES_PER_S, ["classifier_free_dsg"])
    rows += sync_rows(_load(folder, "sync_check.json"))
    rows += auroc_rows(_load(folder, "auroc_compare.json"))
    for name, label, target, paths in (
        ("paper_dit_bf16_b64.json", "DiT-XL/2 classifier-free+DSG bf16 (extra)", DIT_IMAGES_PER_S,
         ["classifier_free_dsg"]),
        ("paper_gdm_bf16_nocl.json", "ADM-256 GDM bf16 (extra)", GDM_IMAGES_PER_S, ["gdm"]),
    ):
        report = _load(folder, name)
        if report is not None:
            rows += throughput_rows(report, label, target, paths)
    return rows


def markdown(rows: List[Row]) -> str:
    lines = ["| check | measured | target | verdict |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the OUT folder of benchmarks/perf/gpu_check.sh")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a check fails or did not run")
    args = parser.parse_args(argv)
    folder = Path(args.out)
    if not folder.is_dir():
        parser.error(f"{folder} is not a folder (run OUT={folder} bash benchmarks/perf/gpu_check.sh first)")
    rows = summarize(folder)
    print(markdown(rows))
    failed = [row for row in rows if row[3].startswith("FAIL") or row[3] == "not run"]
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
