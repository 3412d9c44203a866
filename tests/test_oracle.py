"""Oracle labels: the paper's (InD true, OOD random, DSG off) and the InD-only one."""

import json

import torch

from diffguard_pl import config as config_lib
from diffguard_pl.method import oracle as oracle_lib
from diffguard_pl.config import EvalConfig
from diffguard_pl.jobs.eval_job import evaluate
from diffguard_pl.method.pipeline import DiffGuardPipeline

from helpers.configs import classifier_free_config, eval_argv
from helpers.models import small_classifier, small_diffusion


def test_paper_labels_are_true_for_ind_and_random_per_id_for_ood():
    labels = torch.tensor([2, -1, 4, -1, -1])
    ids = ["i0", "o1", "i2", "o3", "o4"]
    runs = oracle_lib.oracles("both", labels, ids, num_classes=6)
    assert torch.equal(runs["ind"].labels, labels) and runs["ind"].dsg
    paper = runs["paper"]
    assert not paper.dsg and paper.labels[0] == 2 and paper.labels[2] == 4 and (paper.labels >= 0).all()
    # each OOD sample's label depends on its id only: the same alone, in another order, in another batch
    alone = oracle_lib.oracles("paper", labels[3:4], ids[3:4], 6)["paper"].labels
    shuffled = oracle_lib.oracles("paper", labels.flip(0), ids[::-1], 6)["paper"].labels.flip(0)
    assert alone[0] == paper.labels[3] and torch.equal(shuffled, paper.labels)
    # uniform over the classes (1,200 ids: every class drawn, none more than twice as often as another)
    counts = torch.bincount(oracle_lib.random_labels([f"x{i}" for i in range(1200)], 6), minlength=6)
    assert counts.min() > 0 and counts.max() < 2 * counts.min()
    assert oracle_lib.modes("none") == []


def test_paper_oracle_turns_dsg_off_and_resynthesises_everything():
    pipe = DiffGuardPipeline(small_diffusion(conditional=True), small_classifier(), classifier_free_config(omega=5.0))
    images, ids = torch.rand(3, 1, 16, 16), ["a", "b", "c"]
    pred = pipe(images, ids)["pred"]
    labels = torch.stack([pred[0], torch.tensor(-1), torch.tensor(-1)])
    runs = oracle_lib.oracles("both", labels, ids, 6)
    out = pipe(images, ids, runs)
    ind, paper = out["oracle_scores"]["ind"], out["oracle_scores"]["paper"]
    assert torch.equal(ind["l2"], out["scores"]["l2"])  # every ind label is the prediction: nothing redone
    # paper: DSG off, so every sample runs again, and sample 0 (same label) is synthesised without its mask
    latent = pipe.invert(images, ids)["latent"]
    unmasked, _ = pipe.synthesize(latent, runs["paper"].labels, ids, False, masks=None)
    l2 = unmasked.sub(images).pow(2).flatten(1).mean(1)
    assert torch.allclose(paper["l2"], l2, rtol=1e-4)
    assert not torch.equal(paper["l2"][0], out["scores"]["l2"][0])


def test_evaluate_names_both_oracles_and_records_the_mode(tmp_path, small_models, benchmark):
    cfg = config_lib.load(EvalConfig, eval_argv(tmp_path, small_models, "oracle=both"), None)
    results = evaluate(cfg, benchmark)
    names = set(results["detectors"])
    for mode in ("ind", "paper"):
        assert {f"oracle-{mode}/diffguard", f"oracle-{mode}/diffguard/l2", f"oracle-{mode}/diffguard+ebo"} <= names
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["oracle"]["modes"] == ["ind", "paper"] and "random label" in saved["oracle"]["paper"]
