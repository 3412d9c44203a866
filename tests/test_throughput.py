"""The throughput benchmark (benchmarks/perf/throughput*.py, its replay of the model calls in
diffguard_pl/profiling/replay.py) and the execution settings (diffguard.runtime)."""

import copy
import csv
import json
import math

import pytest
import torch

from diffguard_pl import config as config_lib
from diffguard_pl.records import store as records_lib
from diffguard_pl.config import ConfigError, EvalConfig, RuntimeConfig, compose, to_object
from diffguard_pl.jobs.eval_job import evaluate
from diffguard_pl.models import load_classifier, load_diffusion
from diffguard_pl.method.oracle import Oracle
from diffguard_pl.method.pipeline import DiffGuardPipeline
from diffguard_pl.profiling.replay import Replay, cpu_attention_flops
from diffguard_pl.method.scores import check_perceptual_files

from benchmarks.perf import gpu_summary, op_count
from helpers.configs import eval_argv
from helpers.paths import ROOT
from helpers.scripts import run_benchmark


def preset(name, *overrides):
    return to_object(compose(EvalConfig, [ROOT / "conf" / name], list(overrides)))


def mixed_images(benchmark, per_set=4):
    sets = [benchmark.test] + [s.test for s in benchmark.ood.values()]
    return torch.cat([s.images[:per_set] for s in sets]), [i for s in sets for i in s.ids[:per_set]]


def run(cfg, images, ids, oracle=None, dtype=torch.float32, **runtime):
    dg = copy.deepcopy(cfg.diffguard)
    for key, value in runtime.items():
        setattr(dg.runtime, key, value)
    # Fresh models: channels_last and compile change the modules in place.
    diffusion, classifier = load_diffusion(cfg.models.diffusion), load_classifier(cfg.models.classifier)
    diffusion.unet.to(dtype)
    pipe = DiffGuardPipeline(diffusion, classifier.to(dtype), dg)
    return pipe(images.to(dtype), ids, None if oracle is None else {"ind": Oracle(oracle)})


def relative_gaps(a, b):
    a, b = a.double(), b.double()
    rel = (a - b).abs() / a.abs().clamp_min(1e-12)
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return float(rel.median()), float(rel.max()), float(torch.corrcoef(ranks)[0, 1])


@pytest.mark.slow  # the benchmark script's own smoke test (SMOKE=1 bash benchmarks/perf/gpu_check.sh runs it)
@pytest.mark.subprocess
def test_benchmark_reports_ratios_on_a_tiny_cpu_run(tmp_path):
    out = tmp_path / "throughput.json"
    printed = run_benchmark("perf.throughput", "--device", "cpu", "--images", "4", "--batch-size", "4",
                            "--repeats", "1", "--scaling", "1,2", "--scaling-images", "2", "--json", str(out),
                            "diffguard.num_steps=4", "diffguard.depth=2")
    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m benchmarks.perf.throughput --device cpu")
    assert "overhead ratio" in printed and "bare UNet forward at 4 rows" in printed
    # depth 2 x (1 + 1), x (1 + 2) with the unconditional twins
    expected_evals = {"gdm": 4.0, "classifier_free_dsg": 6.0}
    for name in ("gdm", "gdm_aes", "classifier_free_dsg"):
        r = report["paths"][name]
        for key in ("overhead_ratio", "ratio_median", "ratio_formula", "images_per_second", "peak_memory_mb",
                    "bare_unet_ms", "model_seconds", "pipeline_seconds"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key)
        assert 0.3 < r["overhead_ratio"] < 5  # pipeline and replay of its model calls are of one size
        assert r["model_breakdown_seconds"]["unet"] > 0
        if name in expected_evals:
            assert r["unet_evals_per_image"] == expected_evals[name]
        assert r["unet_rows_per_image_replayed"] == r["unet_evals_per_image"]
    assert report["paths"]["gdm"]["guidance_steps_per_image"] == 2.0
    assert report["paths"]["classifier_free_dsg"]["guidance_steps_per_image"] == 0.0
    assert "grad_cam" in report["paths"]["classifier_free_dsg"]["model_breakdown_seconds"]
    assert report["paths"]["gdm"]["classifier_rows"] == 4 * 4  # batch x cutouts (digits preset: 4)
    assert set(report["scaling"]) == {"1", "2"}
    assert report["scaling"]["2"]["speedup_vs_first"] > 0
    assert report["matmul_gflops_per_second"]["none"] > 0
    # the floor: FLOPs of the model calls against the matmul rate
    for name in ("gdm", "gdm_aes", "classifier_free_dsg"):
        r = report["paths"][name]
        for key in ("model_gflop_per_image", "model_gflops_per_second", "fraction_of_matmul_rate",
                    "floor_images_per_second", "pipeline_fraction_of_floor"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key)
        assert "floor:" in printed
    summary_verdicts(out, report, tmp_path / "gpu_check")


def summary_verdicts(report_file, report, folder):
    """benchmarks/perf/gpu_summary.py on a real throughput report (as embedded_fp32.json) and a grown sync count."""
    folder.mkdir()
    (folder / "embedded_fp32.json").write_text(report_file.read_text())
    (folder / "sync_check.json").write_text(json.dumps({
        "gdm": {"syncs_by_depth": {"4": 15, "8": 19}, "must_stay_constant": True, "grows": True},
        "gdm_aes": {"syncs_by_depth": {"4": 19, "8": 23}, "must_stay_constant": False, "grows": True}}))
    rows = {row[0]: row for row in gpu_summary.summarize(folder)}
    for name, path in report["paths"].items():
        row = rows[f"embedded fp32 [{name}], {report['device']}, batch 4: overhead"]
        assert row[1].startswith(f"{path['overhead_ratio']:.3f}")
        assert row[3] == ("pass" if path["overhead_ratio"] <= 1.10 else "FAIL")
    assert rows["synchronisations [gdm]"][3] == "FAIL" and rows["synchronisations [gdm_aes]"][3] == "-"
    assert rows["embedded bf16"][3] == rows["fp32 vs bf16 AUROC"][3] == "not run"
    assert gpu_summary.main([str(folder)]) == 0 and gpu_summary.main([str(folder), "--strict"]) == 1


@pytest.mark.parametrize("name", ["digits_gdm.yaml", "digits_classifier_free.yaml"])
def test_steps_launch_no_scalar_arithmetic(benchmark, name):
    """benchmarks/perf/op_count.py: the uniform loop takes its DDIM coefficients from the per-run table, so the
    square roots outside the model calls do not grow with the steps (there were 12 per inversion + synthesis
    pair before), and the model calls hold most of the operations."""
    results = []
    for depth in (3, 6):
        cfg = preset(name, "diffguard.num_steps=8", f"diffguard.depth={depth}")
        pipe = DiffGuardPipeline(load_diffusion(cfg.models.diffusion), load_classifier(cfg.models.classifier),
                                 cfg.diffguard)
        results.append(op_count.count(pipe, benchmark.test.images[:4], benchmark.test.ids[:4]))
    assert [r["denoiser_calls"] for r in results] == [6, 12]
    assert results[0]["outside_by_op"].get("sqrt") == results[1]["outside_by_op"].get("sqrt")
    assert results[1]["model_per_call"] > 3 * results[1]["outside_per_call"] > 0


def test_flop_count_of_the_replay(benchmark):
    """Each distinct call counted once and scaled by its count; FLOPs grow linearly with the rows; the CPU
    attention kernel (absent from torch's table) is counted as its two products."""
    cfg = preset("digits_classifier_free.yaml")
    pipe = DiffGuardPipeline(load_diffusion(cfg.models.diffusion), load_classifier(cfg.models.classifier),
                             cfg.diffguard)
    unet = ("unet", (2, 1, 16, 16), True)
    one = Replay(pipe, [unet]).flops()
    assert one > 0
    assert Replay(pipe, [unet, unet, unet]).flops() == 3 * one
    assert Replay(pipe, [("unet", (4, 1, 16, 16), True)]).flops() == 2 * one
    guide = ("guide", (8, 1, 16, 16))
    assert Replay(pipe, [unet, guide]).flops() > one
    b, h, s, d = 2, 4, 64, 32
    assert cpu_attention_flops((b, h, s, d), (b, h, s, d), (b, h, s, d)) == 2 * (2 * b * h * s * s * d)


@pytest.mark.slow  # the benchmark script's paper-scale mode (benchmarks/perf/gpu_check.sh runs it on a GPU)
@pytest.mark.subprocess
def test_paper_scale_paths_run_with_shrunken_architectures(tmp_path):
    out = tmp_path / "paper.json"
    run_benchmark("perf.throughput", "--paper-scale", "--tiny-arch", "--device", "cpu", "--images", "2",
                  "--paths", "gdm,classifier_free_dsg", "--json", str(out), "diffguard.num_steps=3",
                  "diffguard.depth=2")
    report = json.loads(out.read_text())
    gdm, dit = report["paths"]["gdm"], report["paths"]["classifier_free_dsg"]
    assert gdm["settings"]["reference"] == "unguided" and gdm["settings"]["cutouts"] == 8
    # The released ladder: 2 inversion steps, then 3 synthesis steps x (guided + unguided reference).
    assert gdm["unet_evals_per_image"] == 2 + 3 * 2
    assert gdm["classifier_rows"] == 2 * 8
    assert dit["unet_evals_per_image"] == 6.0 and "encode_ms" in dit and "grad_cam_ms" in dit
    try:
        check_perceptual_files(["dists"])
    except FileNotFoundError:
        assert any("DISTS" in note for note in report["notes"])
        assert "dists" not in gdm["settings"]["distances"]


def test_runtime_config_checks_the_autocast_choice():
    assert RuntimeConfig().autocast == "none" and RuntimeConfig().inference_mode
    with pytest.raises(ConfigError, match="diffguard.runtime.autocast"):
        RuntimeConfig(autocast="fp8")
    cfg = preset("digits_gdm.yaml", "diffguard.runtime.autocast=bf16", "diffguard.runtime.channels_last=true")
    assert cfg.diffguard.runtime.autocast == "bf16" and cfg.diffguard.runtime.channels_last


# Half precision is emulated on CPUs without AVX-512 BF16 / FP16 (minutes per run there): one quick case in the
# default suite, the rest marked slow.
@pytest.mark.parametrize("name, autocast", [
    ("digits_gdm.yaml", "fp16"),
    pytest.param("digits_classifier_free.yaml", "fp16", marks=pytest.mark.slow),
    pytest.param("digits_gdm.yaml", "bf16", marks=pytest.mark.slow),
    pytest.param("digits_classifier_free.yaml", "bf16", marks=pytest.mark.slow),
])
def test_autocast_stays_close_to_fp32_and_changes_the_fingerprint(benchmark, name, autocast):
    """Tolerance: the same predictions; per distance a median relative gap below 5% and a Spearman rank
    correlation of at least 0.99 (measured with 14 of 20 steps: bf16 0.4-1.9% and >= 0.995, fp16 0.04-0.5%
    and >= 0.998; the guidance gradient goes through the classifier in half precision without loss scaling).
    fp16 runs 6 of 10 steps on half the images here."""
    if autocast == "bf16":
        cfg = preset(name, "diffguard.num_steps=20", "diffguard.depth=14")
        images, ids = mixed_images(benchmark)
    else:  # float16 arithmetic is emulated on most CPUs (about 20x slower): a smaller run
        cfg = preset(name, "diffguard.num_steps=10", "diffguard.depth=6")
        images, ids = mixed_images(benchmark, 2)
    fp32, low = run(cfg, images, ids), run(cfg, images, ids, autocast=autocast)
    assert torch.equal(fp32["pred"], low["pred"])
    for distance in ("l1", "l2", "logit_l1"):
        median, _, spearman = relative_gaps(fp32["scores"][distance], low["scores"][distance])
        assert 0 < median < 0.05 and spearman >= 0.99, (distance, median, spearman)
        assert fp32["scores"][distance].dtype == low["scores"][distance].dtype == torch.float32
    low_cfg = copy.deepcopy(cfg)
    low_cfg.diffguard.runtime.autocast = autocast
    assert records_lib.fingerprint(records_lib.result_config(cfg)) != records_lib.fingerprint(records_lib.result_config(low_cfg))


@pytest.mark.parametrize("name", ["digits_gdm.yaml",
                                  pytest.param("digits_classifier_free.yaml", marks=pytest.mark.slow)])
def test_channels_last_gives_the_same_scores(benchmark, name):
    """Convolutions in another memory layout sum in another order, so the two runs differ by rounding only.

    Compared in float64, where that rounding (about 1e-16 per operation) stays far below the bound even
    after the guided steps amplify it for unstable samples (in float32 the same amplification reached 10% of
    a score on constant images: about 1e6 times the unit roundoff). The bound, 1e-7 relative for every
    sample in the float64 synthesis, leaves a margin of 1e3 over that worst amplification and holds at any
    thread count. The scores are returned in float32, so they may differ by the final rounding: a few units in
    the last place (float32's is 1.2e-7 relative), bounded by 1e-6.
    """
    cfg = preset(name, "diffguard.num_steps=10", "diffguard.depth=6")
    images, ids = mixed_images(benchmark, 3)
    plain = run(cfg, images, ids, dtype=torch.float64)
    last = run(cfg, images, ids, dtype=torch.float64, channels_last=True)
    assert torch.equal(plain["pred"], last["pred"])
    assert plain["synthesis"].dtype == torch.float64
    gap = (last["synthesis"] - plain["synthesis"]).abs().max() / plain["synthesis"].abs().max()
    assert gap < 1e-7, gap
    for distance, value in plain["scores"].items():
        rel = (last["scores"][distance].double() - value.double()).abs() / value.double().abs().clamp_min(1e-12)
        assert rel.max() < 1e-6, (distance, rel.median(), rel.max())


def test_guidance_under_inference_mode_equals_no_grad(benchmark):
    """Inversion and denoiser calls under inference mode; classifier guidance still takes its gradient.

    AES stops some samples early (the general loop) and the oracle re-synthesises some: every score is
    bit for bit the one of a run under no_grad, and the outputs are ordinary tensors.
    """
    cfg = preset("digits_gdm.yaml", "diffguard.num_steps=20", "diffguard.depth=12", "diffguard.aes.enabled=true",
                 "diffguard.aes.psnr=14", "diffguard.reference=unguided")
    images, ids = mixed_images(benchmark, 3)
    oracle = torch.arange(len(ids)) % 6
    inference, plain = run(cfg, images, ids, oracle), run(cfg, images, ids, oracle, inference_mode=False)
    assert inference["depth"].min() < inference["depth"].max()  # some stopped early
    assert torch.equal(inference["depth"], plain["depth"])
    for name in inference["scores"]:
        assert torch.equal(inference["scores"][name], plain["scores"][name]), name
        assert torch.equal(inference["oracle_scores"]["ind"][name], plain["oracle_scores"]["ind"][name]), name
    for key in ("synthesis", "reference", "logits", "pred"):
        assert not inference[key].is_inference(), key
    inference["scores"]["l2"].add_(0)  # usable in place


def test_evaluate_honours_the_runtime_settings(tmp_path, small_models, benchmark):
    """evaluate.py runs the models under the configured autocast and memory format: bf16 changes the scores a
    little (so it was applied), no more than bf16 rounding does."""
    quiet = ["callbacks.curves=false", "callbacks.reconstructions=0", "callbacks.score_plots=false"]
    runs = {}
    for name, settings in (("fp32", []), ("bf16", ["diffguard.runtime.autocast=bf16",
                                                    "diffguard.runtime.channels_last=true"])):
        evaluate(config_lib.load(EvalConfig, eval_argv(tmp_path / name, small_models, *settings, *quiet), None),
                 benchmark)
        with open(tmp_path / name / "scores.csv") as handle:
            runs[name] = {r["id"]: float(r["diffguard/l2"]) for r in csv.DictReader(handle)}
    assert "autocast: bf16" in (tmp_path / "bf16" / "config.yaml").read_text()
    fp32, bf16 = (torch.tensor([runs[k][i] for i in sorted(runs["fp32"])]) for k in ("fp32", "bf16"))
    assert not torch.equal(fp32, bf16)
    assert ((bf16 - fp32).abs() / fp32.abs().clamp_min(1e-6)).median() < 0.1


@pytest.mark.slow
def test_compiled_denoiser_gives_the_same_scores(benchmark):
    cfg = preset("digits_gdm.yaml", "diffguard.num_steps=6", "diffguard.depth=3")
    images, ids = mixed_images(benchmark, 1)
    plain, compiled = run(cfg, images, ids), run(cfg, images, ids, compile=True)
    for name, value in plain["scores"].items():
        assert torch.allclose(value, compiled["scores"][name], rtol=1e-3, atol=1e-6), name
