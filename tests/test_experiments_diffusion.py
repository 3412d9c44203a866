"""The diffusion detectors' experiments (benchmarks/experiments/diffusion_grid.py, fusion_select.py, frontier.py):
their rules on hand-made rows, and the grid end to end on the Digits-OOD models with a tiny budget."""

import json

import pytest
import torch

from benchmarks.experiments import diffusion_grid, frontier, fusion_select
from diffguard_pl.detectors import registry


def row(name, evals, near, far, **extra):
    return {"detector": name, "params": {"evals": evals}, "unet_evals_per_image": evals, "near": near, "far": far,
            "objective": (near + far) / 2, "parts": [name], **extra}


def test_the_grid_rule_takes_the_cheapest_point_within_one_point_of_the_best():
    rows = [row("a", 40, 0.90, 0.90), row("a", 10, 0.895, 0.89), row("a", 5, 0.85, 0.90), row("b", 3, 0.6, 0.6)]
    chosen = diffusion_grid.choose(rows)
    assert chosen["a"]["unet_evals_per_image"] == 10  # 89.25 is within 1 point of 90; 87.5 is not
    assert chosen["a"]["best_objective"] == pytest.approx(0.90)
    assert chosen["b"]["unet_evals_per_image"] == 3


def test_the_fusion_rule_prefers_fewer_evaluations_then_fewer_detectors():
    rows = [row("x+y+z", 0, 0.90, 0.98), row("x+y", 0, 0.895, 0.98), row("d+x", 59, 0.92, 0.97)]
    rows[0]["parts"], rows[1]["parts"], rows[2]["parts"] = ["x", "y", "z"], ["x", "y"], ["d", "x"]
    assert fusion_select.pick(rows)["detector"] == "x+y"  # 94 and 93.75 are within 1 point of 94.5; cost 0; 2 parts


def test_the_frontier_keeps_only_points_no_cheaper_point_beats():
    rows = [row("a", 5, 0.70, 0.90), row("b", 10, 0.60, 0.90), row("c", 12, 0.78, 0.95), row("d", 50, 0.77, 0.95)]
    assert [r["detector"] for r in frontier.pareto(rows)] == ["a", "c"]


def test_every_grid_point_is_complete_and_costs_what_the_registry_says():
    for entry in registry.DIFFUSION_DETECTORS:
        points = diffusion_grid.points(entry.name)
        assert len(points) == len({json.dumps(p, sort_keys=True) for p in points})
        assert all(set(p) == set(entry.defaults) and entry.cost(p) > 0 for p in points)


def test_the_grid_reads_validation_and_training_images_only_and_reuses_its_statistics(tmp_path, monkeypatch):
    from diffguard_pl.api import load_preset
    from diffguard_pl.data import build_benchmark

    monkeypatch.setattr(diffusion_grid, "points", lambda name: [registry.diffusion_params(name, {"levels": k})
                                                                for k in (3, 4)])
    seen = []
    original = diffusion_grid.batch_statistics

    def spy(detectors, image_set, *args, **kwargs):
        seen.extend(image_set.ids)
        return original(detectors, image_set, *args, **kwargs)

    monkeypatch.setattr(diffusion_grid, "batch_statistics", spy)
    out = tmp_path / "grid"
    argv = ["--preset", "digits_gdm", "--limit", "6", "--train", "40", "--detectors", registry.MSMA, "--out", str(out)]
    result = diffusion_grid.main(argv)
    assert [r["params"]["levels"] for r in result["rows"]] == [3, 4]
    assert result["chosen"][registry.MSMA]["unet_evals_per_image"] in (3, 4)
    benchmark = build_benchmark(load_preset("digits_gdm").data)
    test_ids = set(benchmark.test.ids).union(*(s.test.ids for s in benchmark.ood.values()))
    assert seen and not set(seen) & test_ids
    assert len(set(seen) & set(benchmark.train.ids)) == 40
    computed = len(seen)
    again = diffusion_grid.main(argv)
    assert len(seen) == computed  # the second start reads every statistic back
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "fit_seconds"} for r in rows]
    assert timeless(again["rows"]) == timeless(result["rows"])
