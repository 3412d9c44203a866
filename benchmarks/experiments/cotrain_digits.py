"""What co-training buys on the embedded Digits-OOD benchmark.

Variants (all classifiers start from the committed classifier, seed 0, 300 steps, the same optimiser):

- ``committed``: checkpoints/digits/classifier as is (no further training);
- ``finetune``: fine-tuned on real InD images only (conf/train_classifier_finetune.yaml);
- ``cotrain``: co-trained on real images and the frozen diffusion model's x0_pred (conf/train_cotrain.yaml);
- ``joint``: classifier and diffusion model fine-tuned jointly (conf/train_joint.yaml); DiffGuard then
  uses the jointly trained diffusion model as well.

With ``--ablations``, two controls that separate what the joint pair gains:

- ``joint_ce0``: the same joint run with cotrain.ce_weight=0 (the UNet fine-tuned on denoising only);
- ``joint_cls``: the joint classifier with the committed diffusion model.

For each: classifier accuracy on the InD test images, and on the diffusion model's clean estimates
x0_pred(x_t) of the same images at fixed timesteps (noise seeded by sample id and timestep, so every
classifier sees the same noised inputs; x0_pred unclamped, as guidance feeds it); then, with
``--evaluate``, evaluate.py (preset conf/digits_gdm.yaml, oracle=ind) for near / far AUROC and FPR@95
of DiffGuard, its oracle, the fused detector and two classifier baselines, and a paired bootstrap
(same resampled InD / OOD test samples for both) of each variant's DiffGuard AUROC minus the fine-tuned
classifier's. Test splits are only read for the report.

    python -m benchmarks.experiments.cotrain_digits --train --evaluate [--ablations] [key=value ...]
    python -m benchmarks.experiments.cotrain_digits --train --evaluate --seed 1 --out outputs/cotrain_seed1

(``key=value``: overrides for evaluate.py; ``--seed 1``: the variants trained with another seed.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.experiments.common import ROOT, evaluate, score_rows
from diffguard_pl.config import DataConfig
from diffguard_pl.data import OOD_LABEL, build_benchmark
from diffguard_pl.detectors.metrics import auroc
from diffguard_pl.models import load_classifier, load_diffusion
from diffguard_pl.modules.cotrain import clean_estimates, seeded_noise

COMMITTED_CLASSIFIER = ROOT / "checkpoints" / "digits" / "classifier"
COMMITTED_DIFFUSION = ROOT / "checkpoints" / "digits" / "diffusion_uncond"
# name -> (config file, overrides); every run: seed 0, 300 steps from the committed classifier.
TRAININGS = {
    "finetune": ("train_classifier_finetune.yaml", []),
    "cotrain": ("train_cotrain.yaml", []),
    "joint": ("train_joint.yaml", []),
}
ABLATION_TRAININGS = {"joint_ce0": ("train_joint.yaml", ["cotrain.ce_weight=0"])}
DETECTORS = ["diffguard", "oracle-ind/diffguard", "diffguard+ebo", "msp", "ebo"]


def variants(out: Path, ablations: bool) -> dict:
    """name -> (classifier folder, diffusion folder)."""
    found = {
        "committed": (COMMITTED_CLASSIFIER, COMMITTED_DIFFUSION),
        "finetune": (out / "finetune" / "classifier", COMMITTED_DIFFUSION),
        "cotrain": (out / "cotrain" / "classifier", COMMITTED_DIFFUSION),
        "joint": (out / "joint" / "classifier", out / "joint" / "diffusion"),
    }
    if ablations:
        found["joint_ce0"] = (out / "joint_ce0" / "classifier", out / "joint_ce0" / "diffusion")
        found["joint_cls"] = (out / "joint" / "classifier", COMMITTED_DIFFUSION)
    return found


def train(out: Path, trainings: dict, retrain: bool) -> None:
    for name, (config, overrides) in trainings.items():
        if (out / name / "metrics.json").is_file() and not retrain:
            print(f"{name}: trained already ({out / name})")
            continue
        start = time.time()
        subprocess.run([sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'conf' / config}",
                        f"output_dir={out / name}", "trainer.enable_progress_bar=false", *overrides],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        print(f"{name}: trained in {time.time() - start:.0f} s")


def read_scores(folder: Path, detector: str) -> dict:
    """sample id -> (set, score) of the test rows of an evaluation's scores.csv."""
    return {r["id"]: (r["set"], float(r[detector])) for r in score_rows(folder)
            if r["split"] == "test" or int(r["label"]) == OOD_LABEL}


def paired_bootstrap(a: dict, b: dict, ood_sets: list[str], n: int = 1000, seed: int = 0) -> tuple:
    """AUROC(a) - AUROC(b) on the same samples, with a 95% interval over joint resamples of InD and OOD."""
    ind = [i for i, (s, _) in a.items() if s == "ind"]
    ood = [i for i, (s, _) in a.items() if s in ood_sets]
    sa = torch.tensor([a[i][1] for i in ind + ood], dtype=torch.float64)
    sb = torch.tensor([b[i][1] for i in ind + ood], dtype=torch.float64)
    k = len(ind)
    g = torch.Generator().manual_seed(seed)
    diffs = []
    for _ in range(n):
        ri = torch.randint(0, k, (k,), generator=g)
        ro = k + torch.randint(0, len(ood), (len(ood),), generator=g)
        diffs.append(auroc(sa[ri], sa[ro]) - auroc(sb[ri], sb[ro]))
    diffs = torch.tensor(diffs)
    point = auroc(sa[:k], sa[k:]) - auroc(sb[:k], sb[k:])
    return point, float(diffs.quantile(0.025)), float(diffs.quantile(0.975))


@torch.no_grad()
def accuracies(classifier_dir: Path, diffusion_dir: Path, timesteps: list[int], batch: int = 256) -> dict:
    """InD test accuracy and mean NLL of the true class, on real images and on x0_pred at each timestep.

    The noise of x0_pred is seeded by sample id and t: every classifier sees the same estimates of one model.
    """
    test = build_benchmark(DataConfig()).test
    classifier = load_classifier(classifier_dir).eval()
    diffusion = load_diffusion(diffusion_dir)
    diffusion.unet.eval()
    alphas = diffusion.alphas_cumprod.float()

    def scores(images: torch.Tensor, key: str) -> None:
        logits = torch.cat([classifier(images[i : i + batch]) for i in range(0, len(images), batch)])
        result[key] = float((logits.argmax(1) == test.labels).float().mean())
        result[f"nll {key}"] = float(F.cross_entropy(logits, test.labels))

    result = {}
    scores(test.images, "real")
    for t in timesteps:
        noise, _ = seeded_noise(test.ids, tuple(test.images.shape[1:]), salt=1000 + t)
        estimates = []
        for i in range(0, len(test.images), batch):
            images = test.images[i : i + batch]
            steps = torch.full((len(images),), t, dtype=torch.long)
            estimates.append(clean_estimates(diffusion, alphas, images, steps, noise[i : i + batch]))
        estimates = torch.cat(estimates)
        scores(estimates, f"x0@{t}")
    return result


def evaluate_variant(name: str, classifier_dir: Path, diffusion_dir: Path, out: Path, extra: list[str]) -> dict:
    """evaluate.py with one variant's models into OUT/eval_<name> (a finished run is reused); its results."""
    folder = out / f"eval_{name}"
    fresh, start = not (folder / "results.json").is_file(), time.time()
    results = evaluate(folder, "oracle=ind", f"models.classifier={classifier_dir}",
                       f"models.diffusion={diffusion_dir}", *extra, reuse=True)
    if fresh:
        print(f"{name}: evaluated in {time.time() - start:.0f} s")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "cotrain"))
    parser.add_argument("--train", action="store_true", help="train the three variants first (skips finished ones)")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--ablations", action="store_true", help="also joint_ce0 and joint_cls (see above)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every variant (evaluation: seed 0)")
    parser.add_argument("--evaluate", action="store_true", help="run evaluate.py per variant (resumes)")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700])
    parser.add_argument("overrides", nargs="*", help="key=value overrides for evaluate.py")
    args = parser.parse_args()
    out = Path(args.out)
    if args.train:
        trainings = {**TRAININGS, **(ABLATION_TRAININGS if args.ablations else {})}
        train(out, {k: (c, [*o, f"seed={args.seed}"]) for k, (c, o) in trainings.items()}, args.retrain)

    summary = {}
    for name, (classifier_dir, diffusion_dir) in variants(out, args.ablations).items():
        if not (classifier_dir / "classifier.json").is_file():
            print(f"{name}: no classifier at {classifier_dir} (run with --train)")
            continue
        summary[name] = {"classifier": str(classifier_dir), "diffusion": str(diffusion_dir),
                         "accuracy": accuracies(classifier_dir, diffusion_dir, args.timesteps)}
        if args.evaluate:
            results = evaluate_variant(name, classifier_dir, diffusion_dir, out, args.overrides)
            summary[name]["id_accuracy"] = results["id_accuracy"]
            summary[name]["detectors"] = {d: {g: results["detectors"][d][g] for g in ("near", "far")}
                                          for d in DETECTORS if d in results["detectors"]}
            summary[name]["per_ood_auroc"] = {d: {s: m["auroc"] for s, m in results["detectors"][d]["per_ood"].items()}
                                              for d in ("diffguard", "ebo")}
    if args.evaluate and "finetune" in summary:
        benchmark = build_benchmark(DataConfig())
        groups = {g: [n for n, s in benchmark.ood.items() if s.group == g] for g in ("near", "far")}
        base = read_scores(out / "eval_finetune", "diffguard")
        for name in summary:
            mine = read_scores(out / f"eval_{name}", "diffguard")
            summary[name]["diffguard_auroc_minus_finetune"] = {g: paired_bootstrap(mine, base, sets)
                                                                for g, sets in groups.items()}
    (out / "summary.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    keys = ["real"] + [f"x0@{t}" for t in args.timesteps]
    print("\n| variant | " + " | ".join(f"acc {k}" for k in keys) + " | " + " | ".join(f"NLL {k}" for k in keys) + " |")
    print("|---|" + "---:|" * 2 * len(keys))
    for name, entry in summary.items():
        acc = entry["accuracy"]
        print(f"| {name} | " + " | ".join(f"{100 * acc[k]:.1f}" for k in keys) + " | "
              + " | ".join(f"{acc['nll ' + k]:.3f}" for k in keys) + " |")
    evaluated = {n: e for n, e in summary.items() if "detectors" in e}
    if evaluated:
        print("\n| variant | detector | near AUROC | near FPR@95 classic | far AUROC | far FPR@95 classic |")
        print("|---|---|---:|---:|---:|---:|")
        for name, entry in evaluated.items():
            for det, groups in entry["detectors"].items():
                near, far = groups["near"], groups["far"]
                print(f"| {name} | `{det}` | {100 * near['auroc']:.1f} | {100 * near['fpr95_classic']:.1f} | "
                      f"{100 * far['auroc']:.1f} | {100 * far['fpr95_classic']:.1f} |")
        sets = list(next(iter(evaluated.values()))["per_ood_auroc"]["diffguard"])
        for det in ("diffguard", "ebo"):
            print("\n| variant | " + " | ".join(f"`{det}` {s}" for s in sets) + " |")
            print("|---|" + "---:|" * len(sets))
            for name, entry in evaluated.items():
                print(f"| {name} | " + " | ".join(f"{100 * entry['per_ood_auroc'][det][s]:.1f}" for s in sets) + " |")
        if all("diffguard_auroc_minus_finetune" in e for e in evaluated.values()):
            print("\n| variant | `diffguard` near AUROC - finetune [95% paired bootstrap] | far AUROC - finetune |")
            print("|---|---|---|")
            for name, entry in evaluated.items():
                d = entry["diffguard_auroc_minus_finetune"]
                cells = [f"{100 * d[g][0]:+.2f} [{100 * d[g][1]:+.2f}, {100 * d[g][2]:+.2f}]" for g in ("near", "far")]
                print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nwrote {out / 'summary.json'}")


if __name__ == "__main__":
    main()
