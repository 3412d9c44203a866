"""The registry of detectors (diffguard_pl/detectors/registry.py): the one place a detector's name is written, every
runnable classifier detector running on this project's classifier, and one line saying why when one cannot."""

import ast

import pytest
import torch

from diffguard_pl.config import EvalConfig
from diffguard_pl.detectors import registry, tables
from diffguard_pl.detectors.classifier_parts import ClassifierParts, Samples
from diffguard_pl.detectors.fused import with_derived_detectors
from diffguard_pl.records import columns
from diffguard_pl.records.columns import describe_column
from diffguard_pl.detectors.tuning import fit_detectors
from diffguard_pl.models import Classifier, load_classifier
from diffguard_pl.models.tiny_resnet import TinyResNet

from helpers.models import SPEC, small_classifier
from helpers.paths import CHECKPOINTS, ROOT


def samples(image_set, classifier, rows):
    images = image_set.images[:rows]
    with torch.no_grad():
        logits, feats = classifier.forward_with_features(images)
    return Samples(logits, feats, image_set.labels[:rows], images, 16)


@pytest.fixture(scope="module")
def sets(benchmark):
    classifier = load_classifier(CHECKPOINTS / "classifier")  # trained: SHE needs correct predictions per class
    ood = benchmark.ood["digits_6to9"].val
    return classifier, (samples(benchmark.train, classifier, 120), samples(benchmark.val, classifier, 30),
                        samples(ood, classifier, 30))


def test_names_are_written_in_the_registry_only():
    assert len(registry.names()) == len(set(registry.names()))
    assert set(registry.FUSION_DEFAULT) <= set(registry.default_names()) <= set(registry.names(runnable_only=True))
    cfg = EvalConfig()
    assert cfg.baselines.detectors == registry.default_names() and cfg.fusion_partners == list(registry.FUSION_DEFAULT)
    names = set(registry.names()) - {"scale", "entropy"}  # also ordinary words (DiffGuard's guidance scale, ...)
    for path in (ROOT / "diffguard_pl").rglob("*.py"):
        if path.name != "registry.py":
            assert not code_strings(path) & names, f"{path} writes a detector's name"


def code_strings(path):
    """The string constants of a module's code (docstrings, examples for readers, left out)."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs}


def test_docs_hold_the_registry_table():
    assert tables.classifier_table() in (ROOT / "docs" / "detectors.md").read_text()


def test_every_column_is_described():
    for name in registry.names():
        described = describe_column(name)
        assert described["meaning"].startswith("classifier detector: ") and described["direction"]
        assert describe_column(columns.fused_column(name))["unit"] == "z-score sum, unitless"
    assert describe_column("no-such-detector")["meaning"] is None


def test_every_runnable_detector_runs_on_the_tiny_classifier(sets):
    """Fitted on InD train, tuned on validation, scoring a batch as the evaluator does: float64, finite, one score
    per image whatever the batch (a sample's score depends on that sample only)."""
    classifier, (train, val_ind, val_ood) = sets
    names = registry.names(runnable_only=True)
    grids = {"openmax": {"tailsize": [10], "alpha": [1, 3], "euclid_weight": [0.5]}}
    classifier_detectors, choice = fit_detectors(names, ClassifierParts(classifier), train, val_ind, val_ood,
                                                 grids=grids)
    assert choice["left_out"] == {"mcd": "needs dropout to sample with (Monte-Carlo dropout); diffguard_resnet_tiny "
                                         "has none (drop rate 0)"}
    assert set(classifier_detectors.names) == set(names) - {"mcd"}
    for name in classifier_detectors.names:
        record = choice[name]
        assert record["val_auroc"] and all(0 <= a <= 1 for a in record["val_auroc"].values()), name
        assert record["seconds"] > 0 and record["ms_per_image"] > 0
    batch = val_ood.rows(torch.arange(6))
    whole = classifier_detectors.score(batch.logits, batch.features, batch.images)
    halves = [classifier_detectors.score(h.logits, h.features, h.images)
              for h in (batch.rows(torch.arange(3)), batch.rows(torch.arange(3, 6)))]
    for name, scores in whole.items():
        assert scores.dtype == torch.float64 and scores.shape == (6,) and torch.isfinite(scores).all(), name
        torch.testing.assert_close(torch.cat([h[name] for h in halves]), scores, rtol=1e-5, atol=1e-6, msg=name)


class Tokens(TinyResNet):
    """A transformer-like layout: forward_features gives tokens [B, N, D], not 4-D maps."""

    def forward_features(self, x):
        return super().forward_features(x).flatten(2).transpose(1, 2)

    def forward_head(self, x, pre_logits=False):
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)


def test_a_detector_that_cannot_run_says_why_in_one_line(sets):
    _, (train, val_ind, val_ood) = sets
    torch.manual_seed(0)
    tokens = Classifier(Tokens(num_classes=6, in_chans=1), SPEC).eval()
    tokens.model.head = torch.nn.Sequential(torch.nn.Linear(128, 6))  # a head that is not one linear layer
    tokens.model.feature_info = []
    names = ["msp", "vim", "dice", "fdbd", "nci", "rankfeat", "nac", "mds"]
    unlabelled = Samples(train.logits, train.features, None, train.images, 16)
    classifier_detectors, choice = fit_detectors(names, ClassifierParts(tokens), unlabelled, val_ind, val_ood)
    left = choice["left_out"]
    assert classifier_detectors.names == ["msp"] and set(left) == set(names) - {"msp"}
    assert all("\n" not in reason for reason in left.values())
    assert left["vim"] == "needs a linear head (W f + b); diffguard_resnet_tiny's get_classifier() is a Sequential"
    assert left["rankfeat"] == ("needs 4-D feature maps [B, C, H, W]; diffguard_resnet_tiny's forward_features gives "
                                "shape (1, 16, 128)")
    assert "feature_info" in left["nac"] and "labels" in left["mds"]
    with torch.inference_mode():
        _, choice = fit_detectors(["odin", "msp"], ClassifierParts(small_classifier()), train, val_ind, val_ood)
    assert choice["left_out"] == {"odin": "needs gradients, which torch.inference_mode() forbids: run it outside "
                                          "inference mode"}


def test_fused_detectors_say_when_a_partner_did_not_run():
    records = {"id": ["a", "b", "c"], "set": ["ind"] * 3, "split": ["val"] * 3, "diffguard/l2": [1.0, 2.0, 4.0],
               "ebo": [0.0, 1.0, 1.0]}
    records, notes = with_derived_detectors(records, "l2", ["ebo", "vim"])
    assert columns.fused_column("ebo") in records and columns.fused_column("vim") not in records
    assert notes == ["diffguard+vim left out: vim has no scores in this run (results.json baselines.left_out says "
                     "why)"]


def test_docs_hold_the_diffusion_detector_table():
    assert tables.diffusion_table() in (ROOT / "docs" / "detectors.md").read_text()
    for entry in registry.DIFFUSION_DETECTORS:  # every default and grid point has a cost the registry can compute
        assert entry.cost(entry.defaults) > 0
        for key, values in entry.grid.items():
            for value in values:
                assert entry.cost(registry.diffusion_params(entry.name, {key: value})) > 0
    with pytest.raises(ValueError, match="no parameter 'steps'"):
        registry.diffusion_params(registry.LMD, {"steps": 3})
