"""W&B runs worth finding again: the name from the preset and the changed keys, tags, group, job type, notes, the
models read as input artifacts, the exported ones as output artifacts, and the table of the samples the
reconstruction grids show; read back from what W&B wrote offline."""

import math

import pytest
import torch

from diffguard_pl import cli
from diffguard_pl import config as config_lib
from diffguard_pl.config import EvalConfig, TrainConfig
from diffguard_pl.config_shared import ITEM_LENGTH, NAME_LENGTH, preset_name, run_name
from diffguard_pl.jobs.wandb_run import artifact_name, init_arguments, model_inputs, run_group
from diffguard_pl.jobs.wandb_samples import sample_rows
from diffguard_pl.records.columns import DIFFGUARD, fused_column

from helpers.configs import eval_argv
from helpers.paths import ROOT
from helpers.wandb_offline import media_table, records_of


def test_run_name_is_the_preset_and_the_changed_keys_as_written():
    assert run_name("fashion_gdm", ["diffguard.depth=20", "output_dir=/tmp/x", "logger=wandb", "wandb.tags=[a]",
                                    "limit_per_set=50", "trainer.enable_progress_bar=false"]) == (
        "fashion_gdm diffguard.depth=20 limit_per_set=50")
    # A path shows its last part; a shard stays whole; a long item is cut.
    assert run_name("p", ["models.classifier=/data/runs/a/classifier", "shard=1/4"]) == (
        "p models.classifier=.../classifier shard=1/4")
    long = run_name("p", ["fusion_partners=[vim,ebo,knn,diffpath,msma,gmm+she+lts,fdbd+she]"])
    assert len(long) == len("p ") + ITEM_LENGTH and long.endswith("...")
    many = run_name("p", [f"key{i}={i}" for i in range(40)])
    assert len(many) <= NAME_LENGTH and many.startswith("p key0=0 key1=1") and many.endswith("more")
    shown = len(many.split()) - 3  # the preset, "+N", "more"
    assert many.split()[-2] == f"+{40 - shown}"
    assert run_name("digits_gdm", []) == "digits_gdm"
    assert preset_name([str(ROOT / "conf" / "a.yaml"), "conf/fashion_gdm.yaml"]) == "fashion_gdm"
    assert preset_name([]) == "default"


def command_line(schema, argv, default):
    """The config ``cli.run`` hands its job, for ``argv``."""
    seen = []
    assert cli.run(schema, seen.append, argv, default) == 0
    return seen[0]


def test_the_command_line_names_the_run_and_tags_its_preset(tmp_path, capsys):
    default = str(ROOT / "conf" / "digits_gdm.yaml")
    cfg = command_line(EvalConfig, ["--config=fashion_gdm", "diffguard.depth=20", f"output_dir={tmp_path}",
                                    "wandb.tags=[mine,preset:fashion_gdm]"], default)
    assert cfg.wandb.name == "fashion_gdm diffguard.depth=20"
    assert cfg.wandb.tags == ["mine", "preset:fashion_gdm"]  # added once
    config_lib.save(cfg, tmp_path / "config.yaml")  # a saved config keeps its run's name and preset
    again = command_line(EvalConfig, [f"--config={tmp_path / 'config.yaml'}", "limit_per_set=3"], default)
    assert (again.wandb.name, again.wandb.tags) == (cfg.wandb.name, cfg.wandb.tags)
    assert command_line(EvalConfig, ["--config=fashion_gdm"], default).wandb.tags == ["preset:fashion_gdm"]
    assert command_line(EvalConfig, ["wandb.name=kept"], default).wandb.name == "kept"
    assert command_line(EvalConfig, [], default).wandb.name == "digits_gdm"  # the entry point's default preset
    assert cli.run(EvalConfig, None, ["print_config=true", "limit_per_set=3"], default) == 0
    assert "name: digits_gdm limit_per_set=3" in capsys.readouterr().out


def test_tags_group_and_job_type_say_what_the_run_is(tmp_path):
    def evaluation(*argv, files=("fashion_classifier_free.yaml",)):
        return config_lib.load(EvalConfig, [f"--config={ROOT / 'conf' / f}" for f in files] + list(argv), None)

    found = init_arguments(evaluation("split=val", "wandb.tags=[x]"))
    assert found["tags"] == ["x", "benchmark:fashion", "guidance:classifier_free", "split:val"]
    assert found["job_type"] == "evaluate" and found["group"] is None and "fractions (0-1)" in found["notes"]
    assert init_arguments(evaluation(files=("fashion_gdm.yaml",)))["tags"] == [
        "benchmark:fashion", "guidance:classifier", "split:test"]
    folder = init_arguments(evaluation(f"score_folder={tmp_path}"))
    assert folder["job_type"] == "score_folder" and not [t for t in folder["tags"] if t.startswith("split:")]
    # The shards of one evaluation share a group: the run name without its shard, or the output folder's name.
    named = [evaluation(f"shard={i}/2", f"wandb.name=fashion shard={i}/2 depth=3") for i in range(2)]
    assert {run_group(c) for c in named} == {"fashion depth=3"}
    unnamed = [evaluation(f"shard={i}/2", f"output_dir={tmp_path / f'out_{i}'}") for i in range(2)]
    assert {run_group(c) for c in unnamed} == {"out"}
    assert run_group(evaluation("shard=0/2", "wandb.group=sweep")) == "sweep"
    trained = config_lib.load(TrainConfig, [f"--config={ROOT / 'conf' / 'train_fashion_cotrain.yaml'}"], None)
    found = init_arguments(trained)
    assert found["job_type"] == "train-cotrain" and found["tags"] == ["benchmark:fashion", "task:cotrain"]


def test_the_models_a_run_reads_are_named_by_their_key_and_path():
    cfg = config_lib.load(EvalConfig, [f"--config={ROOT / 'conf' / 'fashion_classifier_free.yaml'}"], None)
    fashion = ROOT / "checkpoints" / "fashion"
    assert model_inputs(cfg) == [("models.classifier", str(fashion / "classifier")),
                                 ("models.diffusion", str(fashion / "diffusion_cond")),
                                 ("models.encoder", str(fashion / "encoder")),  # the contrastive distance's
                                 ("diffusion_detectors.model", str(fashion / "diffusion_uncond"))]
    cfg = config_lib.load(EvalConfig, [f"--config={ROOT / 'conf' / 'digits_gdm.yaml'}"], None)
    assert [key for key, _ in model_inputs(cfg)] == ["models.classifier", "models.diffusion"]
    assert artifact_name(fashion / "classifier") == "checkpoints-fashion-classifier"
    assert artifact_name("/data/runs/my run/classifier") == "runs-my-run-classifier"
    trained = config_lib.load(TrainConfig, [f"--config={ROOT / 'conf' / 'train_fashion_cotrain.yaml'}",
                                            "resume=/data/last.ckpt"], None)
    assert [key for key, _ in model_inputs(trained)] == ["resume", "classifier.pretrained_path",
                                                         "cotrain.diffusion_path"]


def synthetic(count=24):
    """Records of ``count`` InD validation samples (scores 0, 1, ...) and one shown InD and one OOD test sample."""
    ids = [f"v{i}" for i in range(count)] + ["t0", "o0"]
    scores = [float(i) for i in range(count)] + [2.0, 30.0]
    records = {"id": ids, "set": ["ind"] * (count + 1) + ["far1"], "split": ["val"] * count + ["test", "test"],
               "label": [0] * (count + 1) + [-1], "pred": [1] * (count + 2), DIFFGUARD: scores,
               fused_column("vim"): [-s for s in scores], "vim": scores, "ebo": scores}
    image = torch.zeros(1, 4, 4)
    shown = {"far1": [{"id": "o0", "pred": 1, "label": -1, "input": image, "synthesis": image, "reference": image}],
             "ind": [{"id": "t0", "pred": 1, "label": 0, "input": image, "synthesis": image, "reference": image}]}
    return records, shown, {"groups": {"far1": "far"}, "score": "l2", "config": {"diffguard": {"reference": "input"}}}


def test_the_sample_table_has_scores_and_decisions_at_the_95_percent_threshold():
    records, shown, header = synthetic()
    columns, rows, meaning = sample_rows(shown, records, header, ["shirt", "coat"], recommended="ebo")
    assert columns == ["id", "set", "image", "synthesis", "class_name", "label_name", DIFFGUARD,
                       fused_column("vim"), "ebo", f"in_out/{DIFFGUARD}", f"in_out/{fused_column('vim')}",
                       "in_out/ebo"]
    assert "recommended" in meaning["ebo"]
    table = [dict(zip(columns, row)) for row in rows]
    assert [r["id"] for r in table] == ["t0", "o0"]  # InD first
    assert (table[0]["class_name"], table[0]["label_name"], table[1]["label_name"]) == ("coat", "shirt", "")
    # 24 InD validation scores 0..23: 95% are kept at 22 (ceil(0.95 * 24) = 23 of them).
    assert [r[f"in_out/{DIFFGUARD}"] for r in table] == ["in", "out"] and "22" in meaning[f"in_out/{DIFFGUARD}"]
    assert [r[f"in_out/{fused_column('vim')}"] for r in table] == ["in", "in"]
    assert set(meaning) == set(columns)
    # Too few InD validation samples: no decisions, and the dictionary says why.
    records, shown, header = synthetic(count=6)
    columns, rows, meaning = sample_rows(shown, records, header)
    assert not [c for c in columns if c.startswith("in_out")] and "limit_per_set" in meaning["in_out"]
    assert math.isclose(rows[1][columns.index(DIFFGUARD)], 30.0)


def input_artifacts(run):
    return {a.name: a for a in records_of(run, "artifact") if a.use_after_commit}


def test_an_offline_evaluation_is_named_tagged_grouped_with_its_inputs_and_sample_table(tmp_path, small_models,
                                                                                       benchmark, monkeypatch,
                                                                                       capsys):
    import wandb

    from diffguard_pl.jobs.eval_job import evaluate

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()  # W&B keeps the settings of the first run in this process
    argv = eval_argv(tmp_path, small_models, "logger=wandb")
    argv.insert(1, "shard=0/2")
    assert cli.run(EvalConfig, lambda cfg: evaluate(cfg, benchmark), argv, None) == 0
    assert "W&B: run 'digits_gdm shard=0/2 models.classifier=.../classifier" in capsys.readouterr().out
    wandb.teardown()  # the run's files complete
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (record,) = records_of(run, "run")
    assert record.display_name == run_name("digits_gdm", argv[1:])
    assert record.run_group == record.display_name.replace(" shard=0/2", "") and record.job_type == "evaluate"
    assert list(record.tags) == ["preset:digits_gdm", "benchmark:digits", "guidance:classifier", "split:test"]
    assert "fractions (0-1)" in record.notes
    inputs = input_artifacts(run)
    assert set(inputs) == {artifact_name(small_models / "classifier"), artifact_name(small_models / "diffusion")}
    classifier = inputs[artifact_name(small_models / "classifier")]
    assert classifier.type == "model" and {e.ref for e in classifier.manifest.contents} >= {
        (small_models / "classifier" / "model.safetensors").as_uri()}
    table = media_table(run, "reconstructions/samples")
    assert {r["set"] for r in table} == {"ind", "digits_6to9", "textures", "faces", "photos", "noise", "constant"}
    assert {"id", "image", "synthesis", "class_name", "label_name", DIFFGUARD} <= set(table[0])
    assert not [c for c in table[0] if c.startswith("in_out")]  # 6 InD validation samples: too few
    explained = {r["column"]: r["meaning"] for r in media_table(run, "reconstructions/samples_columns")}
    assert "too few" in explained["in_out"]


@pytest.mark.training
def test_an_offline_training_run_reads_its_start_and_writes_its_model(tmp_path, small_models, benchmark, monkeypatch):
    import wandb

    from diffguard_pl.jobs.train_job import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()
    pretrained = small_models / "classifier" / "model.safetensors"
    argv = [f"--config={ROOT / 'conf' / 'train_classifier.yaml'}", f"output_dir={tmp_path}", "logger=wandb",
            "trainer.max_steps=2", "trainer.enable_progress_bar=false", "trainer.limit_val_batches=1",
            "data.batch_size=16", f"classifier.pretrained_path={pretrained}"]
    assert cli.run(TrainConfig, lambda cfg: train(cfg, benchmark), argv, None) == 0
    wandb.teardown()  # the run's files complete
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (record,) = records_of(run, "run")
    assert record.job_type == "train-classifier" and "task:classifier" in record.tags
    assert record.display_name.startswith("train_classifier trainer.max_steps=2")
    assert set(input_artifacts(run)) == {artifact_name(pretrained)}
    (output,) = [a for a in records_of(run, "artifact") if not a.use_after_commit]
    assert (output.name, output.type) == (artifact_name(tmp_path / "classifier"), "model")
    assert {e.path for e in output.manifest.contents} == {"classifier.json", "model.safetensors"}
