"""benchmarks/experiments/fashion_claims.py's pure parts: paired run comparisons, the mechanism table, the printed
intervals."""

import pytest
import torch

from benchmarks.experiments import fashion_claims as claims
from diffguard_pl.detectors.metrics import auroc

GROUPS = {"near_set": "near", "far_a": "far", "far_b": "far"}


def rows(scores: dict, split: str = "test") -> dict:
    """scores.csv rows as read_scores gives them: {id: {column: str}}; scores = {set: tensor}."""
    out = {}
    for set_name, values in scores.items():
        for k, v in enumerate(values.tolist()):
            out[f"{set_name}/{k}"] = {"set": set_name, "split": split, "diffguard": str(v), "pred": "1",
                                      "synthesis_pred": "1" if k % 4 else "0"}
    return out


def sets(seed: int, shift: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"ind": torch.randn(60, generator=g), **{s: torch.randn(40, generator=g) + shift for s in GROUPS}}


def test_a_run_against_itself_differs_by_exactly_zero():
    run = rows(sets(0, 0.5))
    diff = claims.paired_runs(run, run, "diffguard", "diffguard", GROUPS)
    assert set(diff) == {"near", "far"}
    for group in diff.values():
        assert group == {"point": 0.0, "lo": 0.0, "hi": 0.0}


def test_the_better_run_wins_and_the_point_is_the_auroc_difference():
    good, weak = sets(1, 2.0), sets(2, 0.0)
    a, b = rows(good), rows(weak)
    diff = claims.paired_runs(a, b, "diffguard", "diffguard", GROUPS)
    point, low, high = diff["near"]["point"], diff["near"]["lo"], diff["near"]["hi"]
    expected = auroc(good["ind"], good["near_set"]) - auroc(weak["ind"], weak["near_set"])
    assert point == pytest.approx(float(expected), abs=1e-12)
    assert 0 < low <= point <= high


def test_only_test_samples_both_runs_scored_are_paired():
    a = rows(sets(3, 1.0))
    b = {i: r for i, r in a.items() if not i.endswith("/0")}  # b lacks sample 0 of every set
    for run, value in ((a, 99.0), (b, -99.0)):  # validation rows that differ between the runs never enter
        run.update({f"val/{i}": row for i, row in rows({"near_set": torch.full((5,), value)}, split="val").items()})
    same = claims.paired_runs(a, b, "diffguard", "diffguard", GROUPS)
    zero = {"point": 0.0, "lo": 0.0, "hi": 0.0}
    assert same["near"] == zero and same["far"] == zero
    a["near_set/0"]["diffguard"] = "1e9"  # a sample only one run scored does not enter either
    assert claims.paired_runs(a, b, "diffguard", "diffguard", GROUPS)["near"] == zero


def test_mnist_is_compared_on_its_own_beside_the_groups():
    groups = {**GROUPS, "mnist": "far"}
    shared = sets(5, 0.0)
    g = torch.Generator().manual_seed(6)
    good = {**shared, "mnist": torch.randn(40, generator=g) + 3.0}
    weak = {**shared, "mnist": torch.randn(40, generator=g)}
    diff = claims.paired_runs(rows(good), rows(weak), "diffguard", "diffguard", groups)
    assert set(diff) == {"near", "far", "mnist"}
    assert diff["near"] == {"point": 0.0, "lo": 0.0, "hi": 0.0}  # the near set's scores are the same in both runs
    expected = auroc(good["ind"], good["mnist"]) - auroc(weak["ind"], weak["mnist"])
    assert diff["mnist"]["point"] == pytest.approx(float(expected), abs=1e-12)
    assert 0 < diff["mnist"]["lo"] <= diff["mnist"]["point"]


def test_mechanism_table_counts_syntheses_classified_as_their_label():
    data = rows(sets(4, 1.0))
    table = {row["set"]: row for row in claims.diagnosis(data, GROUPS)}
    assert list(table) == ["ind", *GROUPS]
    assert table["ind"]["n"] == 60 and table["near_set"]["group"] == "near"
    assert table["ind"]["synthesis_classified_as_guiding_label"] == pytest.approx(45 / 60)  # k % 4 != 0
    mean = float(sets(4, 1.0)["far_a"].double().mean())
    assert table["far_a"]["mean_diffguard_score"] == pytest.approx(mean, abs=1e-12)


def test_interval_printed_only_where_bootstrapped():
    assert claims.interval({"auroc": 0.5234, "auroc_ci": {"lo": 0.5, "hi": 0.55}}) == "52.3 [50.0, 55.0]"
    assert claims.interval({"auroc": 0.5234}) == "52.3"


def test_comparisons_print_from_keyed_objects_as_results_json_holds_them():
    """results.json's comparisons are {"point", "lo", "hi"}; the table prints them in points of %."""
    from diffguard_pl.detectors.results import comparisons

    values = sets(5, 1.0)
    records = {"id": [], "set": [], "split": [], "label": [], "ebo": [], "diffguard": [], "diffguard+ebo": []}
    for set_name, scores in values.items():
        for k, v in enumerate(scores.tolist()):
            for column, value in (("id", f"{set_name}/{k}"), ("set", set_name), ("split", "test"),
                                  ("label", 0 if set_name == "ind" else -1), ("ebo", v), ("diffguard", v),
                                  ("diffguard+ebo", v + (k % 3))):
                records[column].append(value)
    entry = comparisons(records, GROUPS, replicates=200)["diffguard+ebo - ebo"]["near"]
    assert set(entry) == {"point", "lo", "hi"} and entry["lo"] <= entry["point"] <= entry["hi"]
    shown = f"{100 * entry['point']:+.1f} [{100 * entry['lo']:+.1f}, {100 * entry['hi']:+.1f}]"
    assert claims.difference(entry) == shown
