"""The classifier detectors: our KNN and ViM (exact float64 arithmetic), cross-checked against pytorch-ood's on the
committed digits classifier's features; the logit detectors (pytorch-ood's, fed float64 logits); the choice of
hyperparameters on validation splits (diffguard_pl/detectors/tuning.py)."""

import math

import numpy as np
import pytest
import torch
from pytorch_ood.detector import KNN as PoodKNN, EnergyBased, MaxLogit, MaxSoftmax, ViM as PoodViM

from diffguard_pl.config import BaselineConfig, ConfigError
from diffguard_pl.detectors import registry
from diffguard_pl.detectors.baselines import KNN, ViM
from diffguard_pl.detectors.registry import default_vim_dim, default_vim_grid
from diffguard_pl.detectors.classifier_parts import ClassifierParts, Samples, predict
from diffguard_pl.detectors.metrics import auroc
from diffguard_pl.detectors.tuning import TUNED, choose, fit_detectors, resolve_grid

from helpers.models import small_classifier
from helpers.paths import CHECKPOINTS

C, D = 5, 32


def make_data(seed: int = 0, n_train: int = 400, n_test: int = 150):
    """InD: features around 5 class means in an 8-dim subspace; OOD: weak there, strong elsewhere."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(C, D)
    means[:, :8] = torch.randn(C, 8, generator=g)
    means = 6 * means / means.norm(dim=1, keepdim=True)
    head = torch.nn.Linear(D, C)
    head.weight.data, head.bias.data = means / 3, 0.3 * torch.randn(C, generator=g)

    def ind(n):
        return means[torch.randint(0, C, (n,), generator=g)] + 0.4 * torch.randn(n, D, generator=g)

    def ood(n):
        f = torch.randn(n, D, generator=g)
        f[:, :8] *= 0.8
        return f * 1.2

    return {"train": ind(n_train), "in": ind(n_test), "out": ood(n_test), "head": head}


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def digits():
    """The committed digits classifier's logits and features on InD train / InD val / near-OOD val."""
    from diffguard_pl.config import DataConfig
    from diffguard_pl.data import build_benchmark
    from diffguard_pl.detectors.features import compute_outputs
    from diffguard_pl.models import load_classifier

    bench = build_benchmark(DataConfig())
    classifier = load_classifier(CHECKPOINTS / "classifier")
    sets = {"train": bench.train, "ind": bench.val, "ood": bench.ood["digits_6to9"].val}
    out = {key: compute_outputs(classifier, s, 256) for key, s in sets.items()}
    return {"classifier": classifier, "labels": bench.train.labels, **out}


# --------------------------------------------------------------------------------------------------- our KNN


def test_knn_matches_brute_force(data):
    knn = KNN(k=10).fit_features(data["train"])
    train = torch.nn.functional.normalize(data["train"].double(), dim=1)
    for feats in (data["in"], data["out"], data["train"][:50]):
        q = torch.nn.functional.normalize(feats.double(), dim=1)
        expected = np.sort(torch.cdist(q, train).numpy(), axis=1)[:, 9]
        np.testing.assert_allclose(KNN(k=10, chunk_size=7).fit_features(data["train"]).predict_features(feats),
                                   expected, rtol=1e-7, atol=1e-7)  # the bank is kept in float32
        assert knn.predict_features(feats).dtype == torch.float64


def test_knn_exact_ties():
    # Bank of duplicated points: the k-th distance is well defined whichever duplicate is picked.
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    got = KNN(k=3).fit_features(bank).predict_features(torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]]))
    r2 = math.sqrt(2.0)
    torch.testing.assert_close(got, torch.tensor([r2, r2, math.sqrt(2 - r2), r2], dtype=torch.float64))


def test_one_search_gives_each_k_the_distance_of_its_own_search(data):
    """The tuner searches once for the grid's largest k; each k still gets its exact k-th distance."""
    feats = torch.cat([data["in"][:40], data["out"][:40]])
    knn = KNN(k=1).fit_features(data["train"])
    together = knn.predict_grid(feats, [1, 5, 50, 150])
    for k in (1, 5, 50, 150):
        assert torch.equal(together[k], KNN(k=k).fit_features(data["train"]).predict_features(feats)), k
    assert not torch.equal(together[1], together[150])


@pytest.mark.exactness
def test_scores_do_not_depend_on_the_batch(data):
    feats = torch.cat([data["in"][:40], data["out"][:40]])
    for detector in (KNN(k=10).fit_features(data["train"]), ViM(data["head"], 8).fit_features(data["train"])):
        batch = detector.predict_features(feats)
        perm = torch.randperm(80, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(detector.predict_features(feats[perm]), batch[perm], rtol=1e-12, atol=1e-12)
        for i in (0, 13, 79):
            torch.testing.assert_close(detector.predict_features(feats[i:i + 1])[0], batch[i], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------- our ViM


def numpy_vim(train, head, dim):
    x = train.double().numpy()
    w, b = head.weight.detach().double().numpy(), head.bias.detach().double().numpy()
    u = -np.linalg.pinv(w) @ b
    vals, vecs = np.linalg.eigh((x - u).T @ (x - u) / len(x))
    ns = vecs[:, np.argsort(-vals)[dim:]]
    alpha = (x @ w.T + b).max(axis=1).mean() / np.linalg.norm((x - u) @ ns, axis=1).mean()
    return u, ns, alpha


def test_vim_matches_numpy(data):
    vim = ViM(data["head"], default_vim_dim(D)).fit_features(data["train"])
    u, ns, alpha = numpy_vim(data["train"], data["head"], 16)
    assert vim.dim == 16 and vim.ns.shape == (D, D - 16)
    np.testing.assert_allclose(vim.u.numpy(), u, rtol=1e-6, atol=1e-9)
    assert vim.alpha == pytest.approx(alpha, rel=1e-8)
    np.testing.assert_allclose(vim.ns.numpy() @ vim.ns.numpy().T, ns @ ns.T, atol=1e-8)  # up to sign / rotation
    f = data["out"].double().numpy()
    w, b = data["head"].weight.detach().double().numpy(), data["head"].bias.detach().double().numpy()
    z = f @ w.T + b
    expected = alpha * np.linalg.norm((f - u) @ ns, axis=1) - np.log(np.exp(z).sum(axis=1))
    np.testing.assert_allclose(vim.predict_features(data["out"]).numpy(), expected, rtol=1e-8, atol=1e-8)
    # u solves W u + b = 0 for a full-row-rank W: the origin where the logits vanish.
    torch.testing.assert_close(vim._logits(vim.u), torch.zeros(C, dtype=torch.float64), atol=1e-10, rtol=0)


def test_fit_validation(data):
    with pytest.raises(ValueError, match=r"k=401 must lie in \[1, 400\]"):
        KNN(k=401).fit_features(data["train"])
    with pytest.raises(ValueError, match=r"dim=32 must lie in \[1, 31\]"):
        ViM(data["head"], D).fit_features(data["train"])
    with pytest.raises(ValueError, match="width 16, the head takes 32"):
        ViM(data["head"], 4).fit_features(data["train"][:, :16])
    assert default_vim_dim(2048) == 1000 and default_vim_dim(768) == 512 and default_vim_dim(512) == 256


@pytest.mark.parametrize("d", [2, 3, 16, 32, 100, 256, 257, 512, 1024, 2048, 4096])
def test_vim_grid(d):
    grid = default_vim_grid(d)
    assert grid == sorted(set(grid)) and all(1 <= v < d for v in grid)
    if d > 256:  # OpenOOD's values where they fit below D
        assert grid == [v for v in (256, 1000) if v < d]
    else:  # the same ratios to D as OpenOOD's to ResNet-50's 2048, up to rounding and the clip to [1, D - 1]
        assert set(grid) == {min(max(round(d * r / 2048), 1), d - 1) for r in (256, 1000)}
    assert default_vim_grid(32) == [4, 16] and default_vim_grid(2048) == [256, 1000]


# ------------------------------------------------------------------------- cross-check against pytorch-ood


def test_our_knn_equals_pytorch_oods_on_the_digits_classifier(digits):
    """Same k, same normalisation: the same ranking (AUROC to 1e-9); distances apart by scikit-learn's float32."""
    (_, train), (_, ind), (_, ood) = digits["train"], digits["ind"], digits["ood"]
    for k in (1, 10, 50, 100):
        ours = KNN(k=k).fit_features(train)
        theirs = PoodKNN(None, k=k).fit_features(train, digits["labels"])
        a, b = [d.predict_features(ind) for d in (ours, theirs)], [d.predict_features(ood) for d in (ours, theirs)]
        assert abs(auroc(a[0], b[0]) - auroc(a[1], b[1])) <= 1e-9, k
        assert (a[0] - a[1]).abs().max() < 1e-6 and (b[0] - b[1]).abs().max() < 1e-6


def test_our_vim_differs_from_pytorch_oods_by_its_float32_only(digits):
    """Same dim: the same AUROC (1e-9) where the principal space is well separated (dims of the grid for 128-d
    features); at dim 64 pytorch-ood's float32 eigendecomposition moves the residual space (by 0.14), and its
    residual projector is then the float32 one, to 1e-4, where ours is the float64 one."""
    classifier, (_, train), (_, ind), (_, ood) = digits["classifier"], digits["train"], digits["ind"], digits["ood"]
    head = classifier.model.get_classifier()
    assert default_vim_grid(train.shape[1]) == [16, 62]
    for dim in (4, 16):
        ours = ViM(head, dim).fit_features(train)
        theirs = PoodViM(None, d=dim, w=head.weight, b=head.bias).fit_features(train, digits["labels"])
        a = [auroc(d.predict_features(ind).double(), d.predict_features(ood).double()) for d in (ours, theirs)]
        assert abs(a[0] - a[1]) <= 1e-9, dim

    def projector(dtype, dim):
        x, w, b = train.to(dtype), head.weight.detach().to(dtype), head.bias.detach().to(dtype)
        centred = x + torch.linalg.pinv(w) @ b
        vals, vecs = torch.linalg.eigh(centred.T @ centred / len(x))
        ns = vecs[:, torch.argsort(vals, descending=True)[dim:]]
        return (ns @ ns.T).double()

    theirs = PoodViM(None, d=64, w=head.weight, b=head.bias).fit_features(train, digits["labels"])
    ours = ViM(head, 64).fit_features(train)
    p64, p32 = projector(torch.float64, 64), projector(torch.float32, 64)
    assert (p64 - p32).norm() > 0.05  # float32 moves the residual space at this dim
    assert (theirs.principal_subspace.double() @ theirs.principal_subspace.double().T - p32).norm() < 1e-4
    assert (ours.ns @ ours.ns.T - p64).norm() < 1e-8


def test_logit_detectors_are_pytorch_oods_fed_float64_logits(digits):
    """MSP, EBO and MaxLogit are pytorch-ood's; the registry feeds them float64 logits, so they equal pytorch-ood's
    on float64 logits exactly, and float32 softmax saturation does not tie distinct samples."""
    parts = ClassifierParts(digits["classifier"])
    logits = torch.cat([digits["ind"][0], digits["ood"][0]])
    samples = Samples(logits, torch.cat([digits["ind"][1], digits["ood"][1]]))
    for name, reference in (("msp", MaxSoftmax.score), ("ebo", EnergyBased.score), ("maxlogit", MaxLogit.score)):
        entry = registry.classifier_detector(name)
        got = predict(parts.build(entry, {"t": 1.0} if name == "ebo" else {}), entry, parts, samples)
        assert got.dtype == torch.float64 and torch.equal(got, reference(logits.double()))
    # Hand-checked values.
    hand = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [2.0, 5.0]])
    few = Samples(hand, torch.zeros(3, 2))
    build = lambda n: parts.build(registry.classifier_detector(n), {})  # noqa: E731
    torch.testing.assert_close(predict(build("msp"), registry.classifier_detector("msp"), parts, few),
                               torch.tensor([-0.5, -0.75, -1 / (1 + math.exp(-3))], dtype=torch.float64))
    torch.testing.assert_close(predict(build("ebo"), registry.classifier_detector("ebo"), parts, few),
                               torch.tensor([-math.log(2), -math.log(4), -(5 + math.log1p(math.exp(-3)))],
                                            dtype=torch.float64))
    # Saturation: in float32 both confident samples get MSP -1 exactly; in float64 they stay apart.
    confident = torch.tensor([[20.0, 0.0], [25.0, 0.0]])
    assert MaxSoftmax.score(confident)[0] == MaxSoftmax.score(confident)[1] == -1.0
    msp = predict(build("msp"), registry.classifier_detector("msp"), parts, Samples(confident, torch.zeros(2, 2)))
    assert msp[0] > msp[1]


# ------------------------------------------------------------------------------ choosing on validation data


def clustered(seed: int = 0):
    """Features where k = 100 is the one good KNN grid value.

    Train: 4 InD clusters of 150 tight points plus one "decoy" cluster of 75 points in another direction. InD
    validation points sit in the InD clusters, OOD validation points in the decoy cluster. For k <= 75 both find
    close neighbours; for 75 < k <= 150 only InD does; for k > 150 neither does.
    """
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(5, D, generator=g), dim=1)
    head = torch.nn.Linear(D, 4)
    head.weight.data, head.bias.data = 3 * dirs[:4], torch.zeros(4)

    def samples(*clusters):
        f = torch.cat([dirs[i] + 0.05 * torch.randn(n, D, generator=g) for i, n in clusters])
        return Samples(head(f).detach(), f)

    train = samples(*[(i, 150) for i in range(4)], (4, 75))
    return head, train, samples(*[(i, 30) for i in range(4)]), samples((4, 60))


class Parts:
    """ClassifierParts' interface over a bare linear head (the detectors of features need no more)."""

    def __init__(self, head):
        self.head, self.weight, self.bias = head, head.weight.detach(), head.bias.detach()

    build = ClassifierParts.build


def test_the_k_with_the_best_validation_auroc_is_chosen():
    head, train, val_ind, val_ood = clustered()
    fitted, record = choose(registry.classifier_detector("knn"), Parts(head), train, val_ind, val_ood)
    assert record["grid"] == {"k": [50, 100, 200, 500]} and record["dropped"] == {"k": [1000]}  # above 675 features
    for k in (50, 100, 200, 500):
        direct = KNN(k=k).fit_features(train.features)
        assert record["val_auroc"][str(k)] == auroc(direct.predict_features(val_ind.features),
                                                    direct.predict_features(val_ood.features))
    aurocs = record["val_auroc"]
    assert record["k"] == fitted.detector.k == 100 and aurocs["100"] > max(aurocs[k] for k in ("50", "200", "500"))
    assert record["reason"] == TUNED and record["fit_samples"] == 675 and record["ms_per_image"] > 0
    # ViM: every candidate's AUROC is that of a ViM fitted with that dim; the best one is kept.
    fitted, record = choose(registry.classifier_detector("vim"), Parts(head), train, val_ind, val_ood)
    assert record["grid"] == {"dim": default_vim_grid(D)}
    for dim in default_vim_grid(D):
        direct = ViM(head, dim).fit_features(train.features)
        assert record["val_auroc"][str(dim)] == auroc(direct.predict_features(val_ind.features),
                                                      direct.predict_features(val_ood.features))
    best = max(record["val_auroc"].values())
    assert record["val_auroc"][str(record["dim"])] == best and fitted.detector.dim == record["dim"]
    assert record["dim"] == min(int(d) for d, a in record["val_auroc"].items() if a == best)


def test_ties_go_to_the_smaller_value(data):
    # Widely separated synthetic InD / OOD: every k reaches the same validation AUROC.
    head = data["head"]
    as_samples = lambda f: Samples(head(f).detach(), f)  # noqa: E731
    _, record = choose(registry.classifier_detector("knn"), Parts(head), as_samples(data["train"]),
                       as_samples(data["in"]), as_samples(data["out"]), grid_override={"k": [30, 20, 10]})
    assert len(set(record["val_auroc"].values())) == 1 and record["k"] == 10 and record["grid"] == {"k": [10, 20, 30]}


@pytest.mark.parametrize("missing", ["none", "empty"])
def test_defaults_without_ood_validation_data(missing):
    head, train, val_ind, val_ood = clustered()
    no_ood = None if missing == "none" else val_ood.rows(torch.arange(0))
    _, record = choose(registry.classifier_detector("knn"), Parts(head), train, val_ind, no_ood)
    assert record["k"] == 50 and record["reason"] == "no OOD validation data: the registry's default values"
    assert record["val_auroc"] == {}
    _, record = choose(registry.classifier_detector("vim"), Parts(head), train, val_ind, no_ood)
    assert record["dim"] == default_vim_dim(D)
    small = train.rows(torch.arange(30))  # a bank smaller than the default k: k is capped at its size
    assert choose(registry.classifier_detector("knn"), Parts(head), small, val_ind, no_ood)[1]["k"] == 30


def test_values_from_the_config_are_used():
    head, train, val_ind, val_ood = clustered()
    fitted, record = choose(registry.classifier_detector("knn"), Parts(head), train, val_ind, val_ood, {"k": 7})
    assert fitted.detector.k == record["k"] == 7 and record["reason"] == "fixed by config (baselines.params)"
    direct = KNN(k=7).fit_features(train.features)
    assert record["val_auroc"] == {"7": auroc(direct.predict_features(val_ind.features),
                                              direct.predict_features(val_ood.features))}
    with pytest.raises(ValueError, match=r"baselines.params.knn.k=700 must lie in \(0, 675\]"):
        choose(registry.classifier_detector("knn"), Parts(head), train, val_ind, val_ood, {"k": 700})
    assert resolve_grid(registry.classifier_detector("gen"), registry.Sizes(10, 8, 6))[0]["M"] == [6]  # M <= C


def test_baseline_config():
    cfg = BaselineConfig()
    assert cfg.detectors == registry.default_names() and {"msp", "ebo", "maxlogit", "knn", "vim"} <= set(cfg.detectors)
    assert cfg.params == {} and cfg.grids == {}
    with pytest.raises(ConfigError, match="baselines.detectors has 'nope'"):
        BaselineConfig(detectors=["msp", "nope"])
    with pytest.raises(ConfigError, match="baselines.params.knn.dim: knn has the hyperparameters k"):
        BaselineConfig(params={"knn": {"dim": 3}})
    with pytest.raises(ConfigError, match="baselines.grids.vim.dim=4 must be a non-empty list"):
        BaselineConfig(grids={"vim": {"dim": 4}})
    with pytest.raises(ConfigError, match="baselines.params has 'odin', which baselines.detectors does not run"):
        BaselineConfig(detectors=["msp"], params={"odin": {"eps": 0.1}})


class Poisoned(torch.utils.data.Dataset):
    """A test split that must never be read."""

    def __len__(self):
        return 5

    def __getitem__(self, index):
        raise AssertionError("a test split was read while fitting the classifier detectors")


def test_classifier_detectors_tuned_on_validation_splits_only(benchmark):
    from diffguard_pl.config import EvalConfig
    from diffguard_pl.data.benchmark import Benchmark, OODSet
    from diffguard_pl.detectors.fitting import fit_classifier_detectors

    names = list(benchmark.ood)
    ood = {name: OODSet(s.group, s.val.subset(range(10)), Poisoned()) for name, s in benchmark.ood.items()}
    ood[names[0]] = OODSet(ood[names[0]].group, benchmark.ood[names[0]].val.subset([]), Poisoned())  # empty val
    small = Benchmark(benchmark.name, benchmark.num_classes, benchmark.channels, benchmark.resolution,
                      benchmark.train.subset(range(120)), benchmark.val.subset(range(40)), Poisoned(), ood)
    cfg = EvalConfig()
    cfg.baselines.detectors = ["knn", "vim", "odin", "msp"]
    classifier_detectors, choice = fit_classifier_detectors(small_classifier(), small, cfg)
    assert choice["validation"] == {"ind": 40, "ood": 10 * (len(names) - 1)}
    assert choice["knn"]["grid"] == {"k": [50, 100]}
    assert classifier_detectors.fitted["knn"].detector.bank.shape[0] == 120
    assert len(choice["odin"]["val_auroc"]) == 8 and choice["left_out"] == {}
    # Values from the config, and no OOD validation at all.
    cfg.baselines.params = {"knn": {"k": 3}, "vim": {"dim": 2}}
    no_ood = Benchmark(small.name, small.num_classes, small.channels, small.resolution, small.train, small.val,
                       Poisoned(), {name: OODSet(s.group, s.val.subset([]), Poisoned()) for name, s in ood.items()})
    classifier_detectors, choice = fit_classifier_detectors(small_classifier(), no_ood, cfg)
    assert (choice["knn"]["k"], choice["vim"]["dim"]) == (3, 2) and choice["validation"] == {"ind": 40, "ood": 0}
    assert choice["odin"]["reason"] == "no OOD validation data: the registry's default values"
    assert choice["odin"]["params"] == {"temperature": 1000, "eps": 0.0014}


def test_fit_detectors_records_each_choice_and_cost(data):
    head = data["head"]
    as_samples = lambda f: Samples(head(f).detach(), f, torch.zeros(len(f), dtype=torch.long))  # noqa: E731
    _, choice = fit_detectors(["msp", "knn", "gen"], Parts(head), as_samples(data["train"]), as_samples(data["in"]),
                              as_samples(data["out"]))
    assert set(choice) == {"msp", "knn", "gen", "left_out", "validation"}
    assert choice["gen"]["grid"]["M"] == [C] and choice["gen"]["dropped"]["M"] == [10, 50, 100, 200, 500, 1000]
    assert len(choice["gen"]["val_auroc"]) == 7 and all(k.startswith("gamma=") for k in choice["gen"]["val_auroc"])
    for record in (choice[n] for n in ("msp", "knn", "gen")):
        assert record["seconds"] > 0 and record["ms_per_image"] > 0 and record["val_auroc"]
