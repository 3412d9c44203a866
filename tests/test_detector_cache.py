"""The fitted classifier detectors cached on disk (diffguard_pl/detectors/detector_cache.py): read back, they score
bit for bit as the fit did; other settings or data miss the cache; a damaged entry is fitted again."""

import pytest
import torch

from diffguard_pl.config import EvalConfig
from diffguard_pl.data.benchmark import Benchmark, OODSet
from diffguard_pl.detectors.features import compute_outputs
from diffguard_pl.detectors.fitting import fit_classifier_detectors
from diffguard_pl.models import load_classifier

from helpers.paths import CHECKPOINTS

# Logits, features and images; state in tensors (knn, vim, ...), a Parameter (tempscale), a ParameterDict (klm), a
# fraction of the training samples (nnguide), and none the cache keeps (openmax: fitted again at each start).
DETECTORS = ["msp", "ebo", "gen", "klm", "tempscale", "openmax", "knn", "vim", "mds", "rmds", "gmm", "dice", "fdbd",
             "nnguide", "she", "nci", "pnml", "lts", "ash", "react", "scale", "vra", "odin"]
OPENMAX = {"tailsize": 10, "alpha": 3, "euclid_weight": 1.0}  # one candidate: its grid has 150


@pytest.fixture(scope="module")
def small(benchmark):
    """The embedded benchmark cut small: 120 InD training images, 40 InD and 10 per OOD set for validation."""
    ood = {name: OODSet(s.group, s.val.subset(range(10)), s.test) for name, s in benchmark.ood.items()}
    return Benchmark(benchmark.name, benchmark.num_classes, benchmark.channels, benchmark.resolution,
                     benchmark.train.subset(range(120)), benchmark.val.subset(range(40)), benchmark.test, ood)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFGUARD_CACHE", str(tmp_path))
    return tmp_path / "detectors"


def config(detectors, **baselines) -> EvalConfig:
    cfg = EvalConfig()
    cfg.baselines.detectors = list(detectors)
    for key, value in baselines.items():
        setattr(cfg.baselines, key, value)
    return cfg


def classifier():
    """The committed digits classifier, loaded anew."""
    return load_classifier(CHECKPOINTS / "classifier")


def fit(small, cfg, capsys):
    """The detectors of a classifier loaded anew (fitted or read from the cache) and what the console said."""
    classifier_detectors, choice = fit_classifier_detectors(classifier(), small, cfg)
    return classifier_detectors, choice, capsys.readouterr().err


def read_from_cache(said: str) -> bool:
    """Whether the console said the detectors (not the features) were read from the cache."""
    return any(line.startswith("classifier detectors:") and "read from the cache" in line for line in said.splitlines())


def test_read_back_they_score_bit_for_bit(small, cache, capsys):
    cfg = config(DETECTORS, params={"openmax": OPENMAX})
    fitted, choice, said = fit(small, cfg, capsys)
    entry, = cache.glob("*.pt")
    assert not read_from_cache(said) and f"(cached in {entry}; openmax fitted again at each start)" in said
    assert choice["left_out"] == {} and not any(choice[name]["cached"] for name in DETECTORS)

    read, again, said = fit(small, cfg, capsys)
    assert f"classifier detectors: {len(DETECTORS) - 1} read from the cache {entry}" in said
    assert "fitting 1 classifier detectors whose state the cache does not keep" in said
    assert list(again) == list(choice) and read.names == fitted.names == DETECTORS
    for name in DETECTORS:  # the same choice; the timings of the fit that wrote the entry, and said so
        if name == "openmax":  # fitted again: its own timings
            assert {**again[name], "seconds": 0, "ms_per_image": 0} == {**choice[name], "seconds": 0, "ms_per_image": 0}
        else:
            assert again[name] == {**choice[name], "cached": True}
    assert again["validation"] == choice["validation"] and again["left_out"] == {}

    images = torch.cat([small.val.images[:8], small.ood["digits_6to9"].val.images[:8]])
    logits, features = compute_outputs(classifier(), [{"image": x} for x in images], 16)
    expected, scores = fitted.score(logits, features, images), read.score(logits, features, images)
    for name in DETECTORS:
        assert scores[name].dtype == torch.float64 and torch.equal(scores[name], expected[name]), name


def test_other_settings_or_data_miss_the_cache(small, cache, capsys):
    cfg = config(["msp", "knn"])
    first = fit(small, cfg, capsys)[1]
    fewer = Benchmark(small.name, small.num_classes, small.channels, small.resolution, small.train.subset(range(100)),
                      small.val, small.test, small.ood)
    relabelled = Benchmark(small.name, small.num_classes, small.channels, small.resolution,
                           type(small.train)(small.train.name, small.train.images, (small.train.labels + 1) % 6,
                                             small.train.ids, "train"), small.val, small.test, small.ood)
    for data, changed in ((small, config(["msp", "knn"], grids={"knn": {"k": [5, 10]}})),
                          (small, config(["msp", "knn"], params={"knn": {"k": 3}})),
                          (small, config(["msp", "knn"], train_samples=100)),
                          (small, config(["knn", "msp"])),
                          (fewer, cfg), (relabelled, cfg)):
        said = fit(data, changed, capsys)[2]
        assert not read_from_cache(said) and "fitting 2 classifier detectors" in said
    assert len(list(cache.glob("*.pt"))) == 7
    again, said = fit(small, cfg, capsys)[1:]
    assert "classifier detectors: 2 read from the cache" in said
    assert again["knn"] == {**first["knn"], "cached": True}


@pytest.mark.parametrize("damage", ["garbage", "truncated", "another entry"])
def test_a_damaged_entry_is_fitted_again(small, cache, capsys, damage):
    cfg = config(["msp", "knn", "klm"])
    fitted = fit(small, cfg, capsys)[0]
    entry, = cache.glob("*.pt")
    if damage == "garbage":
        entry.write_bytes(b"not a torch file")
    elif damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:200])
    else:  # a valid entry under the wrong name: its state belongs to other inputs
        fit(small, config(["msp", "knn", "klm"], params={"knn": {"k": 3}}), capsys)
        other, = set(cache.glob("*.pt")) - {entry}
        other.replace(entry)
    refitted, choice, said = fit(small, cfg, capsys)
    warning, = [line for line in said.splitlines() if line.startswith("warning:")]
    assert warning.startswith(f"warning: the cached classifier detectors {entry} cannot be read (")
    assert warning.endswith("): fitting them again") and not read_from_cache(said)
    assert f"(cached in {entry})" in said and not any(choice[name]["cached"] for name in ("msp", "knn", "klm"))
    assert refitted.fitted["knn"].detector.k == fitted.fitted["knn"].detector.k
    assert read_from_cache(fit(small, cfg, capsys)[2])  # written again, whole
