"""Real-checkpoint and real-benchmark plumbing: OpenOOD-style lists end to end, folder scoring, Hub-cache models,
classifier weights files and the paper presets' dry runs, all against tiny stand-in files built in tmp_path."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffguard_pl import config as config_lib
from diffguard_pl.config import ConfigError, DiffusionConfig, EvalConfig
from diffguard_pl.data.image_lists import OPENOOD_BENCHMARKS
from diffguard_pl.errors import DataError, MissingCheckpointError
from diffguard_pl.jobs.eval_job import evaluate
from diffguard_pl.models import DiffusionModel, build_scheduler, build_unet, load_diffusion, save_diffusion

from helpers.configs import eval_argv
from helpers.paths import ROOT


def write_image(path, rng, size=(20, 18), gray=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def write_lists(root, definition, per_list=3, seed=0):
    """Image files and OpenOOD-style lists for every list of ``definition`` (labels cycle over the classes)."""
    rng = np.random.default_rng(seed)
    specs = [(f"ind_{s}", spec, False) for s, spec in definition["ind"].items()]
    specs += [(f"{name}_{split}", o[split], True) for name, o in definition["ood"].items()
              for split in ("val", "test") if o.get(split) and "list" in o[split]]
    for tag, spec, ood in specs:
        lines = []
        for i in range(per_list):
            rel = f"{tag}/img_{i}.png"
            write_image(root / spec.get("data_dir", "") / rel, rng)
            lines.append(f"{rel} {-1 if ood else i % definition['num_classes']}")
        (root / spec["list"]).parent.mkdir(parents=True, exist_ok=True)
        (root / spec["list"]).write_text("\n".join(lines) + "\n")


def small_definition():
    ind = {s: {"list": f"lists/{s}.txt", "data_dir": "images"} for s in ("train", "val", "test")}
    ood = {"near_set": {"group": "near", "val": {"list": "lists/near_val.txt", "data_dir": "images"},
                        "test": {"list": "lists/near_test.txt", "data_dir": "images"}},
           "far_folder": {"group": "far", "val": None, "test": {"folder": "far_images"}}}
    return {"num_classes": 6, "ind": ind, "ood": ood}


def lists_argv(tmp_path, models, root, *extra):
    definition = json.dumps(small_definition()).replace(" ", "")
    return eval_argv(tmp_path / "out", models, "data.benchmark=lists", f"data.root={root}",
                     f"data.definition={definition}", "callbacks.curves=false", "callbacks.score_plots=false",
                     "callbacks.reconstructions=0", *extra)


@pytest.fixture()
def tiny_lists(tmp_path):
    root = tmp_path / "data"
    write_lists(root, small_definition(), per_list=24)
    rng = np.random.default_rng(5)
    for i in range(5):
        write_image(root / "far_images" / f"sub/{i}.jpg", rng)
    return root


def test_image_list_benchmark_evaluates_end_to_end(tmp_path, small_models, tiny_lists):
    cfg = config_lib.load(EvalConfig, lists_argv(tmp_path, small_models, tiny_lists, "limit_per_set=null"), None)
    results = evaluate(cfg)
    assert results["num_samples"] == {"ind": 24, "near_set": 24, "far_folder": 5}
    assert results["data"]["skipped"] == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    ids = {r["id"] for r in rows}
    assert "ind_test/img_0.png" in ids and "far_images/sub/0.jpg" in ids  # ids: paths as listed / in the folder
    assert np.isfinite(results["detectors"]["diffguard"]["near"]["auroc"])


def test_bad_lines_and_corrupt_files_fail_clearly_or_are_skipped_and_counted(tmp_path, small_models, tiny_lists):
    listing = tiny_lists / "lists" / "near_test.txt"
    listing.write_text(listing.read_text() + "near_set_test/missing.png -1\nno_label_here\n")
    (tiny_lists / "images" / "near_set_test" / "img_3.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"near_test\.txt:25"):
        evaluate(config_lib.load(EvalConfig, lists_argv(tmp_path, small_models, tiny_lists), None))
    cfg = config_lib.load(EvalConfig, lists_argv(tmp_path, small_models, tiny_lists, "data.on_error=skip",
                                                 "limit_per_set=null"), None)
    results = evaluate(cfg)
    assert results["num_samples"]["near_set"] == 23  # the corrupt image dropped, the two bad lines too
    report = results["data"]["sets"]["near_set/test"]
    assert results["data"]["skipped"] == 3 and report["skipped"] == 3
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["data"]["skipped"] == 3


def test_a_run_stopped_by_a_corrupt_file_resumes_with_on_error_skip_which_names_what_it_drops(tmp_path, small_models,
                                                                                             tiny_lists, capsys):
    corrupt = tiny_lists / "images" / "near_set_test" / "img_3.png"
    corrupt.write_bytes(b"not a png at all")  # found only when its batch is read (raise mode decodes lazily)
    argv = lists_argv(tmp_path, small_models, tiny_lists, "limit_per_set=null", "data.eval_batch_size=8")
    with pytest.raises(DataError, match=r"img_3\.png: cannot read the image"):
        evaluate(config_lib.load(EvalConfig, argv, None))
    assert (tmp_path / "out" / "records").is_dir()  # the batches before it are kept
    capsys.readouterr()
    results = evaluate(config_lib.load(EvalConfig, argv + ["data.on_error=skip"], None))  # not another config's
    out = capsys.readouterr().out
    assert "resuming: " in out and "data: 1 images or lines skipped (data.on_error=skip)" in out
    listing = tiny_lists / "lists" / "near_test.txt"
    assert f"  skipped {listing}:4: {corrupt}: cannot decode the image" in out  # named on the console: line and file
    report = results["data"]
    [problem] = report["sets"]["near_set/test"]["problems"]  # and in results.json, counted alike
    assert report["skipped"] == 1 and problem["file"] == str(listing) and str(corrupt) in problem["reason"]
    assert results["num_samples"] == {"ind": 24, "near_set": 23, "far_folder": 5}


def test_score_folder_writes_scores_and_decisions(tmp_path, small_models):
    folder = tmp_path / "unlabelled"
    rng = np.random.default_rng(1)
    for i in range(4):
        write_image(folder / f"x{i}.png", rng, size=(30, 30))
    argv = eval_argv(tmp_path / "out", small_models, f"score_folder={folder}", "limit_per_set=30",
                     "callbacks.curves=false", "callbacks.score_plots=false", "callbacks.reconstructions=0")
    evaluate(config_lib.load(EvalConfig, argv, None))
    thresholds = json.loads((tmp_path / "out" / "thresholds.json").read_text())["thresholds"]
    rows = list(csv.DictReader(open(tmp_path / "out" / "folder_scores.csv")))
    assert [r["id"] for r in rows] == [f"folder/x{i}.png" for i in range(4)]
    for row in rows:
        for name in ("diffguard", "msp", "diffguard+ebo"):
            assert int(row[f"out/{name}"]) == int(float(row[name]) > thresholds[name])
    scores = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    val = sorted(float(r["diffguard"]) for r in scores if r["set"] == "ind")
    assert len(val) == 30 and thresholds["diffguard"] == val[int(np.ceil(0.95 * 30)) - 1]


def fake_hub_model(cache, repo_id, model: DiffusionModel, scheduler):
    snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    save_diffusion(model, scheduler, snapshot)
    (snapshot.parents[1] / "refs").mkdir(parents=True, exist_ok=True)
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)


def test_hub_ids_resolve_from_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = DiffusionConfig(block_out_channels=[32, 32], attention_levels=[False, False], layers_per_block=1)
    unet = build_unet(cfg, 3, 32, None)
    fake_hub_model(tmp_path / "hub", "google/ddpm-cifar10-32", DiffusionModel(unet, build_scheduler(cfg).alphas_cumprod),
                   build_scheduler(cfg))
    model = load_diffusion("google/ddpm-cifar10-32")
    assert model.sample_size == 32 and model.in_channels == 3
    with pytest.raises(MissingCheckpointError, match="huggingface-cli download someone/absent"):
        load_diffusion("someone/absent")


# ------------------------------------------------------------------------ presets


def preset_standins(tmp_path, monkeypatch, name):
    """Tiny files of the right format where the preset expects the real ones; returns key=value overrides."""
    import huggingface_hub.constants
    import torchvision

    from diffguard_pl.models.classifier import build_classifier, ClassifierSpec

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    bench = "cifar10" if name == "cifar10_gdm" else "imagenet"
    write_lists(tmp_path / "data", OPENOOD_BENCHMARKS[bench], per_list=2)
    overrides = [f"data.root={tmp_path / 'data'}", f"output_dir={tmp_path / 'out'}"]
    small = DiffusionConfig(block_out_channels=[32, 32], attention_levels=[False, False], layers_per_block=1)
    scheduler = build_scheduler(small)
    if name == "cifar10_gdm":
        fake_hub_model(tmp_path / "hub", "google/ddpm-cifar10-32",
                       DiffusionModel(build_unet(small, 3, 32, None), scheduler.alphas_cumprod), scheduler)
        spec = ClassifierSpec("openood_resnet18_32x32", 10, 3, 32, [0.5] * 3, [0.5] * 3)
        weights = tmp_path / "best.ckpt"
        torch.save(build_classifier(spec).model.state_dict(), weights)
    else:
        weights = tmp_path / "resnet50-0676ba61.pth"
        torch.save(torchvision.models.resnet50().state_dict(), weights)
    if name == "imagenet_gdm":
        folder = tmp_path / "adm256_uncond"
        save_diffusion(DiffusionModel(build_unet(small, 3, 256, None), scheduler.alphas_cumprod), scheduler, folder)
        overrides.append(f"models.diffusion={folder}")
        (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
        for file in ("dists_weights.pt", "vgg16-397923af.pth"):
            (tmp_path / "torch" / "hub" / "checkpoints" / file).write_bytes(b"stand-in")
    if name == "imagenet_ldm":
        from diffusers import AutoencoderKL, DiTTransformer2DModel

        dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=1, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                            layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=256)
        fake_hub_model(tmp_path / "hub", "facebook/DiT-XL-2-256",
                       DiffusionModel(dit, scheduler.alphas_cumprod, 1000, 1000, vae), scheduler)
    overrides.append(f"models.classifier={weights}")
    return overrides


@pytest.mark.parametrize("name", ["cifar10_gdm", "imagenet_gdm", "imagenet_ldm"])
def test_preset_dry_runs_check_files_and_print_the_plan(tmp_path, monkeypatch, capsys, name):
    overrides = preset_standins(tmp_path, monkeypatch, name)
    cfg = config_lib.load(EvalConfig, [f"--config={ROOT / 'conf' / f'{name}.yaml'}", "dry_run=true", *overrides], None)
    assert evaluate(cfg) is None
    printed = capsys.readouterr().out
    assert "every file and model is in place" in printed
    # imagenet_gdm: the released ladder, 90 inversion steps and 91 synthesis steps, guided and unguided
    per_image = {"cifar10_gdm": 35 * 3, "imagenet_gdm": 90 + 91 * 2, "imagenet_ldm": 25 * 3}[name]
    assert f"at most {per_image:,} per image" in printed
    if name == "imagenet_gdm":
        assert "released ladder; inversion depth 90 reaches timestep 900" in printed
        assert "x0 clipping: both" in printed and "8 released cutouts" in printed
        assert "from timestep 900 (exact handoff), 91 steps" in printed
    if name == "imagenet_ldm":
        assert "timesteps 1, 41, ..., 961" in printed and "reaches timestep 961" in printed
    assert "oracle: none" in printed
    sets = OPENOOD_BENCHMARKS["cifar10" if name == "cifar10_gdm" else "imagenet"]["ood"]
    assert all(f"  {s} " in printed for s in sets)
    assert not (tmp_path / "out" / "results.json").exists()


def test_preset_dry_run_names_what_is_missing(tmp_path, monkeypatch):
    overrides = preset_standins(tmp_path, monkeypatch, "imagenet_gdm")
    (tmp_path / "torch" / "hub" / "checkpoints" / "dists_weights.pt").unlink()
    cfg = config_lib.load(EvalConfig, [f"--config={ROOT / 'conf' / 'imagenet_gdm.yaml'}", "dry_run=true", *overrides],
                          None)
    with pytest.raises(MissingCheckpointError, match="dists_weights.pt"):
        evaluate(cfg)
    cfg = config_lib.load(EvalConfig, [f"--config={ROOT / 'conf' / 'imagenet_gdm.yaml'}", "dry_run=true",
                                       *overrides, f"models.classifier={tmp_path / 'none.pth'}"], None)
    with pytest.raises(MissingCheckpointError, match="none.pth"):
        evaluate(cfg)


def test_weights_file_classifier_needs_an_arch(tmp_path, small_models, tiny_lists):
    weights = small_models / "classifier" / "model.safetensors"
    argv = lists_argv(tmp_path, small_models, tiny_lists, f"models.classifier={weights}")
    with pytest.raises(ConfigError, match="models.classifier_arch"):
        evaluate(config_lib.load(EvalConfig, argv, None))
