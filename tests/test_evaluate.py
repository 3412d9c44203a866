"""evaluate.py end to end on a slice of the embedded benchmark, with small models saved in tmp_path."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from diffguard_pl import config as config_lib
from diffguard_pl.config import EvalConfig
from diffguard_pl.errors import ConfigError
from diffguard_pl.jobs.eval_job import evaluate
from diffguard_pl.detectors.fused import with_derived_detectors
from diffguard_pl.detectors.results import summarize
from diffguard_pl.records.store import RecordWriter, read_records

from helpers.configs import eval_argv
from helpers.paths import ROOT
from helpers.wandb_offline import media_table, offline_summary

DETECTORS = {"diffguard", "msp", "ebo", "maxlogit", "knn", "vim", "diffguard+ebo"}


def test_evaluate_writes_results_and_scores(tmp_path, small_models, benchmark):
    cfg = config_lib.load(EvalConfig, eval_argv(tmp_path, small_models, "oracle=ind"), None)
    results = evaluate(cfg, benchmark)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["detectors"].keys() == results["detectors"].keys()
    names = set(saved["detectors"])
    assert DETECTORS <= names and not names & {"pred", "synthesis_pred", "depth", "unet_evals"}
    assert {f"diffguard/{d}" for d in cfg.diffguard.distances} <= names
    assert {"oracle-ind/diffguard", "oracle-ind/diffguard/l2"} <= names
    for name, entry in saved["detectors"].items():
        assert set(entry["per_ood"]) == {"digits_6to9", "textures", "faces", "photos", "noise", "constant"}
        interval = {"auroc_ci"} if "/" not in name.replace("oracle-ind/", "") else set()
        for metrics in entry["per_ood"].values():
            assert set(metrics) == {"auroc", "fpr95_classic", "fpr95_openood", "aupr_in", "aupr_out",
                                    "aupr_in_openood", "aupr_out_openood"} | interval
            assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k != "auroc_ci")
            if interval:  # a keyed object around the point estimate
                assert set(metrics["auroc_ci"]) == {"lo", "hi"}
                assert metrics["auroc_ci"]["lo"] <= metrics["auroc"] <= metrics["auroc_ci"]["hi"]
        assert set(entry["near"]) == set(entry["far"]) == {"auroc", "fpr95_classic", "fpr95_openood"} | interval
    # Paired comparisons: each fused detector against its partner, the oracle against DiffGuard, as keyed objects.
    assert {"diffguard+ebo - ebo", "oracle-ind/diffguard - diffguard"} <= set(saved["comparisons"])
    for pair in saved["comparisons"].values():
        assert set(pair) == {"near", "far"}
        assert all(set(d) == {"point", "lo", "hi"} and d["lo"] <= d["hi"] for d in pair.values())
    assert saved["num_samples"] == {"ind": 6, "digits_6to9": 6, "textures": 6, "faces": 6, "photos": 6,
                                    "noise": 6, "constant": 6}
    assert 0.0 <= saved["id_accuracy"] <= 1.0
    # How often the synthesis is classified as its guiding label, per set, from the records' synthesis_pred.
    assert set(saved["synthesis_follows_label"]) == {"ind"} | set(saved["num_samples"])
    assert all(0.0 <= v <= 1.0 for v in saved["synthesis_follows_label"].values())
    assert saved["throughput"]["unet_evals_per_image"] >= 4 and saved["throughput"]["images_per_second"] > 0
    with open(tmp_path / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 * 8  # InD val + InD test + 6 OOD sets, 6 each
    logged = (tmp_path / "logs" / "metrics.csv").read_text()
    assert "diffguard+ebo/near_auroc" in logged and "id_accuracy" in logged
    assert len({r["id"] for r in rows}) == len(rows)
    follows = [r["pred"] == r["synthesis_pred"] for r in rows if r["set"] == "faces"]
    assert saved["synthesis_follows_label"]["faces"] == pytest.approx(sum(follows) / len(follows))
    assert {"id", "set", "split", "label", "pred", "synthesis_pred", "depth", "unet_evals", "diffguard", "msp"} <= set(rows[0])
    # The column dictionary beside scores.csv describes every column: meaning, unit and, for scores, the sign.
    dictionary = json.loads((tmp_path / "columns.json").read_text())
    assert dictionary["file"] == "scores.csv" and list(dictionary["columns"]) == list(rows[0])
    described = dictionary["columns"]
    assert all(d["meaning"] for d in described.values())
    assert all(d["direction"] == "higher = more OOD" for c, d in described.items() if c in names)
    assert "minus the PSNR" in described["diffguard/psnr"]["meaning"] and "dB" in described["diffguard/psnr"]["unit"]
    assert "diffguard/l2" in described["diffguard"]["meaning"]  # the preset's diffguard.score
    assert "the input" in described["diffguard/l2"]["meaning"]  # the preset's diffguard.reference
    assert "oracle" in described["oracle-ind/diffguard/l2"]["meaning"]
    # The near-OOD AUROC in results.json is recomputed from the CSV rows.
    from diffguard_pl.detectors.metrics import auroc

    ind = [float(r["diffguard"]) for r in rows if r["set"] == "ind" and r["split"] == "test"]
    near = [float(r["diffguard"]) for r in rows if r["set"] == "digits_6to9"]
    assert saved["detectors"]["diffguard"]["per_ood"]["digits_6to9"]["auroc"] == pytest.approx(
        auroc(torch.tensor(ind), torch.tensor(near)))
    # KNN's k and ViM's dim: tuned on every validation sample (limit_per_set aside), recorded in results.json,
    # and recorded again by a resumed run that has nothing left to compute (and fits no baselines).
    choice = saved["baselines"]
    assert choice["validation"] == {"ind": len(benchmark.val), "ood": sum(len(s.val) for s in benchmark.ood.values())}
    assert choice["knn"]["reason"].startswith("best validation AUROC")
    assert str(choice["knn"]["k"]) in choice["knn"]["val_auroc"]
    assert evaluate(cfg, benchmark)["baselines"] == choice
    assert json.loads((tmp_path / "results.json").read_text())["baselines"] == choice
    # Fused with every classifier detector afterwards, from the records alone: the run's own fused rows unchanged.
    from diffguard_pl.jobs.merge import merge

    refused = merge([tmp_path], tmp_path / "all_fused", ["all"])["detectors"]
    partners = [n for n in saved["baselines"] if n in saved["detectors"] and not n.startswith("diffguard")]
    assert len(partners) > 5 and {f"diffguard+{n}" for n in partners} <= set(refused)
    assert refused["diffguard+ebo"] == saved["detectors"]["diffguard+ebo"]
    assert refused["diffguard+msp"] != refused["diffguard+ebo"]
    with pytest.raises(ConfigError, match="--partners nope: not among"):
        merge([tmp_path], tmp_path / "bad", ["nope"])


@pytest.mark.subprocess
def test_cli_reports_missing_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"output_dir={tmp_path}",
                             f"models.classifier={tmp_path / 'nothing'}"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert str(tmp_path / "nothing") in result.stderr and "train.py" in result.stderr


def _records():
    return {
        "id": ["v0", "v1", "v2", "t0", "t1", "o0", "o1"],
        "set": ["ind", "ind", "ind", "ind", "ind", "far1", "far1"],
        "split": ["val", "val", "val", "test", "test", "test", "test"],
        "label": [0, 1, 0, 1, 0, -1, -1],
        "pred": [0, 1, 0, 1, 1, 0, 0],
        "synthesis_pred": [5, 5, 5, 1, 0, 1, 1],
        "depth": [2] * 7,
        "unet_evals": [4] * 7,
        "diffguard/l2": [1.0, 2.0, 3.0, 1.5, 2.5, 4.0, 0.5],
        "ebo": [-3.0, -2.0, -1.0, -2.0, -1.0, 0.0, -2.5],
    }


def test_fusion_is_normalised_on_ind_validation_only():
    records, _ = with_derived_detectors(_records(), "l2")
    # val InD: dg mean 2 std 1, ebo mean -2 std 1  ->  fused = (dg - 2) + (ebo + 2)
    want = [(dg - 2.0) + (e + 2.0) for dg, e in zip(records["diffguard/l2"], records["ebo"])]
    assert records["diffguard+ebo"] == pytest.approx(want)
    changed = _records()
    changed["diffguard/l2"][3] = 100.0  # a test score moves: the normalisation must not
    changed, _ = with_derived_detectors(changed, "l2")
    assert changed["diffguard+ebo"][5] == pytest.approx(records["diffguard+ebo"][5])


def test_summary_counts_test_split_and_accuracy():
    records, _ = with_derived_detectors(_records(), "l2")
    result = summarize(records, {"far1": "far"})
    assert result["id_accuracy"] == 0.5 and result["num_samples"] == {"ind": 2, "far1": 2}
    assert result["synthesis_follows_label"] == {"ind": 0.5, "far1": 0.0}  # test split only
    # InD test {1.5, 2.5} vs OOD {4.0, 0.5}: pairs won 2 of 4
    assert result["detectors"]["diffguard"]["per_ood"]["far1"]["auroc"] == 0.5
    assert result["detectors"]["diffguard"]["far"]["auroc"] == 0.5


def test_column_dictionary_says_sign_and_unit_of_the_unguided_reference_columns():
    from diffguard_pl.records.columns import column_dictionary

    columns = ["reference_pred", "round_trip_psnr", "diffguard/l2", "diffguard/l2@input", "diffguard/contrastive",
               "diffguard/psnr@input", "diffguard", "diffguard+knn", "vim", "oracle-paper/diffguard+ebo"]
    described = column_dictionary(columns, score="contrastive", reference="unguided")
    assert "unguided reconstruction" in described["reference_pred"]["meaning"]
    assert described["round_trip_psnr"]["unit"] == "dB" and described["round_trip_psnr"]["direction"] is None
    assert "unguided reconstruction" in described["diffguard/l2"]["meaning"]
    assert "between the guided synthesis and the input" in described["diffguard/l2@input"]["meaning"]
    assert "negated" in described["diffguard/psnr@input"]["unit"]
    assert "contrastive encoder" in described["diffguard/contrastive"]["meaning"]
    assert "diffguard/contrastive" in described["diffguard"]["meaning"]
    assert "z-score" in described["diffguard+knn"]["unit"] and "ViM" in described["vim"]["meaning"]
    assert "paper oracle" in described["oracle-paper/diffguard+ebo"]["meaning"]
    assert all(d["meaning"] for d in described.values())
    assert column_dictionary(["diffguard/made_up"])["diffguard/made_up"]["meaning"] is None  # no guessing


def test_the_store_keeps_one_record_per_sample(tmp_path):
    a = {k: v[:4] for k, v in _records().items()}
    b = {k: v[3:] for k, v in _records().items()}  # the fourth sample written twice (two shards' folders merged)
    header = {"fingerprint": "f"}
    for rank, part in enumerate((a, b)):
        writer = RecordWriter(tmp_path, rank, header)
        writer.append(part)
        writer.close()
    _, finished, torn = read_records([tmp_path])
    assert sorted(finished) == sorted(_records()["id"]) and torn == 0


def test_derived_detectors_leave_the_records_alone():
    records = _records()
    derived, _ = with_derived_detectors(records, "l2")
    assert records == _records() and {"diffguard", "diffguard+ebo"} <= set(derived) - set(records)


def test_wandb_offline_run_holds_per_set_metrics_curves_images_and_same_results(tmp_path, small_models, benchmark,
                                                                                monkeypatch, capfd):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_SILENT", raising=False)  # W&B's own console lines, as a user sees them
    import wandb

    wandb.teardown()  # W&B keeps the settings of the first run in this process (an earlier test's, silent)
    aes = ["diffguard.aes.enabled=true", "diffguard.aes.psnr=5"]  # a threshold no sample reaches at depth 2
    plain = evaluate(config_lib.load(EvalConfig, eval_argv(tmp_path / "csv", small_models, *aes), None), benchmark)
    capfd.readouterr()
    logged = evaluate(config_lib.load(EvalConfig, eval_argv(tmp_path / "wb", small_models, "logger=wandb", *aes),
                                      None), benchmark)
    console = "".join(capfd.readouterr())
    assert logged["detectors"] == plain["detectors"]  # logging never changes results
    # The console: W&B says where the run is and how to upload it, without the `anonymous` warning and without
    # panels of one-point sparklines or summary values after the job's own table.
    assert "wandb sync" in console and "offline-run-" in console
    assert "anonymous" not in console and "Run history" not in console and "Run summary" not in console
    (run,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    saved = json.loads((tmp_path / "wb" / "results.json").read_text())
    # Per-set metrics of every detector, intervals and comparisons, read back from the run summary.
    summary = offline_summary(run)
    for name, entry in saved["detectors"].items():
        for set_name, metrics in entry["per_ood"].items():
            for key in ("auroc", "fpr95_classic", "fpr95_openood", "aupr_in", "aupr_out"):
                assert summary[f"{name}/{set_name}_{key}"] == pytest.approx(metrics[key])
        assert summary[f"{name}/near_auroc"] == pytest.approx(entry["near"]["auroc"])
    ci = saved["detectors"]["diffguard"]["per_ood"]["faces"]["auroc_ci"]
    assert (summary["diffguard/faces_auroc_lo"], summary["diffguard/faces_auroc_hi"]) == (ci["lo"], ci["hi"])
    assert summary["diffguard+ebo/far_auroc_hi"] == saved["detectors"]["diffguard+ebo"]["far"]["auroc_ci"]["hi"]
    difference = saved["comparisons"]["diffguard+ebo - ebo"]["near"]
    assert summary["comparisons/diffguard+ebo - ebo/near_auroc_diff_lo"] == difference["lo"]
    # ... and as tables.
    per_set = media_table(run, "results/per_set")
    assert len(per_set) == len(saved["detectors"]) * 6
    row = next(r for r in per_set if r["detector"] == "diffguard" and r["set"] == "digits_6to9")
    assert row["group"] == "near" and row["auroc_lo"] == saved["detectors"]["diffguard"]["per_ood"][
        "digits_6to9"]["auroc_ci"]["lo"]
    assert {(r["comparison"], r["group"]) for r in media_table(run, "results/comparisons")} == {
        (pair, group) for pair, entry in saved["comparisons"].items() for group in entry}
    # Per-step curves as quantile bands per set, InD in every chart, and the AES threshold.
    faces = media_table(run, "curves/psnr/faces_table")
    assert {r["lineKey"] for r in faces} == {"InD q10", "InD q50", "InD q90", "faces (far-OOD) q10",
                                             "faces (far-OOD) q50", "faces (far-OOD) q90", "AES threshold"}
    assert {r["lineVal"] for r in faces if r["lineKey"] == "AES threshold"} == {5.0}
    quantiles = media_table(run, "curves/quantiles")
    assert {(r["set"], r["group"]) for r in quantiles} >= {("ind", "InD"), ("digits_6to9", "near"), ("faces", "far")}
    media = run / "files" / "media"
    assert list((media / "images" / "reconstructions").glob("digits_6to9_*.png"))
    assert list((media / "images" / "scores").glob("diffguard+ebo_*.png"))
    # The same figures as files, whatever the logger.
    for out in (tmp_path / "csv", tmp_path / "wb"):
        assert (out / "curves" / "psnr.png").is_file() and (out / "reconstructions" / "ind.png").is_file()
        with open(out / "curves" / "curves.csv") as handle:
            rows = list(csv.DictReader(handle))
        sets = {r["set"] for r in rows}
        assert sets == {"ind", "digits_6to9", "textures", "faces", "photos", "noise", "constant"}
        psnr_ind = [r for r in rows if r["set"] == "ind" and r["metric"] == "psnr"]
        assert [int(r["step"]) for r in psnr_ind] == [1, 2]  # depth 2: one row per inversion step
        assert all(int(r["count"]) == 12 for r in psnr_ind)  # InD val + InD test, 6 each
        assert float(psnr_ind[0]["q10"]) <= float(psnr_ind[0]["q50"]) <= float(psnr_ind[0]["q90"])


def test_flat_metrics_and_tables_hold_every_number_of_results_json():
    from diffguard_pl.jobs.wandb_report import flat_metrics, result_tables

    records, _ = with_derived_detectors(_records(), "l2")
    results = summarize(records, {"far1": "far"}, replicates=50)
    results["throughput"] = {"images_per_second": 2.0, "machine": {"device": "cpu"}}
    flat = flat_metrics(results)
    per_set = results["detectors"]["diffguard"]["per_ood"]["far1"]
    assert {k: flat[f"diffguard/far1_{k}"] for k in per_set if k != "auroc_ci"} == {
        k: v for k, v in per_set.items() if k != "auroc_ci"}
    assert flat["diffguard/far1_auroc_lo"] == per_set["auroc_ci"]["lo"]
    assert flat["diffguard/far_auroc_hi"] == results["detectors"]["diffguard"]["far"]["auroc_ci"]["hi"]
    assert flat["comparisons/diffguard+ebo - ebo/far_auroc_diff"] == results["comparisons"]["diffguard+ebo - ebo"][
        "far"]["point"]
    assert flat["synthesis_follows_label/far1"] == 0.0 and flat["throughput/images_per_second"] == 2.0
    assert "throughput/machine" not in flat and not [k for k in flat if k.startswith("diffguard/near_")]  # no near set
    tables = result_tables(results)
    columns, rows = tables["results/per_set"]
    assert len(rows) == len(results["detectors"])  # one OOD set
    assert dict(zip(columns, rows[0]))["ood_samples"] == 2
    assert {r[1] for r in tables["results/near_far"][1]} == {"far"}  # the empty near group is left out


def test_out_of_memory_names_the_batch_and_keeps_finished_samples(tmp_path, small_models, benchmark, monkeypatch):
    from diffguard_pl.method.pipeline import DiffGuardPipeline
    from diffguard_pl.records.store import read_file

    original, calls = DiffGuardPipeline.__call__, []

    def failing(self, images, ids=None, oracles=None):
        calls.append(len(ids))
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, images, ids, oracles)

    monkeypatch.setattr(DiffGuardPipeline, "__call__", failing)
    cfg = config_lib.load(EvalConfig, eval_argv(tmp_path, small_models, "data.eval_batch_size=4"), None)
    with pytest.raises(RuntimeError, match=r"out of memory in test batch 2 .*data.eval_batch_size.*resumes"):
        evaluate(cfg, benchmark)
    (records,) = (tmp_path / "records").glob("*.jsonl")
    assert len(read_file(records)[1]) == 8  # the two finished batches are on disk
    monkeypatch.setattr(DiffGuardPipeline, "__call__", original)
    results = evaluate(cfg, benchmark)  # the same command resumes and completes
    assert sum(results["num_samples"].values()) == 6 * 7


def test_reconstructions_keep_the_extremes_whatever_the_order():
    from diffguard_pl.callbacks.reconstructions import ReconstructionLogger

    rows = [{"id": f"s{i}", "score": float(score)} for i, score in enumerate([5, 1, 9, 3, 7, 1, 8])]
    keep = ReconstructionLogger(per_set=4, select="extremes")._keep
    # the two lowest (ties by id: s1 before s5) and the two highest scores
    assert [r["id"] for r in keep(rows)] == ["s1", "s5", "s6", "s2"]
    assert [r["id"] for r in keep(rows[::-1])] == ["s1", "s5", "s6", "s2"]
    assert [r["id"] for r in keep(keep(rows[:4]) + keep(rows[4:]))] == ["s1", "s5", "s6", "s2"]  # per batch, merged
    assert [r["id"] for r in ReconstructionLogger(per_set=3)._keep(rows[::-1])] == ["s0", "s1", "s2"]
    with pytest.raises(ValueError, match="reconstruction_select"):
        ReconstructionLogger(select="best")
