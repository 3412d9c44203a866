import dataclasses
import math

import numpy as np
import pytest
import torch

from diffguard_pl.detectors.baselines import (
    BaselineStats,
    baseline_scores,
    default_vim_dim,
    default_vim_grid,
    energy,
    fit_baselines,
    knn_grid_for_bank,
    knn_score,
    knn_scores,
    max_logit,
    msp,
    tune_baselines,
    vim_score,
)
from diffguard_pl.config import BaselineConfig, ConfigError
from diffguard_pl.detectors.metrics import auroc

C, D = 5, 32
KEYS = {"msp", "ebo", "maxlogit", "knn", "vim"}


def make_data(seed: int = 0, n_train: int = 400, n_test: int = 150):
    """InD: features around 5 class means in an 8-dim subspace; OOD: weak there, strong elsewhere."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(C, D)
    means[:, :8] = torch.randn(C, 8, generator=g)
    means = 6 * means / means.norm(dim=1, keepdim=True)
    weight = means / 3
    bias = 0.3 * torch.randn(C, generator=g)

    def ind(n):
        y = torch.randint(0, C, (n,), generator=g)
        return means[y] + 0.4 * torch.randn(n, D, generator=g)

    def ood(n):
        f = torch.randn(n, D, generator=g)
        f[:, :8] *= 0.8
        return f * 1.2

    head = lambda f: f @ weight.T + bias  # noqa: E731
    train, test_in, test_out = ind(n_train), ind(n_test), ood(n_test)
    return {
        "train": (train, head(train)),
        "in": (test_in, head(test_in)),
        "out": (test_out, head(test_out)),
        "weight": weight,
        "bias": bias,
    }


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def stats(data):
    feats, logits = data["train"]
    return fit_baselines(feats, logits, data["weight"], data["bias"], knn_k=10)


def test_logit_scores_hand_checked():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [2.0, 5.0]])
    torch.testing.assert_close(msp(logits), torch.tensor([-0.5, -0.75, -1 / (1 + math.exp(-3))], dtype=torch.float64))
    torch.testing.assert_close(
        energy(logits),
        torch.tensor([-math.log(2), -math.log(4), -(5 + math.log1p(math.exp(-3)))], dtype=torch.float64),
    )
    torch.testing.assert_close(max_logit(logits), torch.tensor([0.0, -math.log(3), -5.0], dtype=torch.float64))
    torch.testing.assert_close(
        energy(logits[:1], temperature=2.0), torch.tensor([-2 * math.log(2)], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="temperature"):
        energy(logits, temperature=0.0)


def test_every_baseline_separates_synthetic_ood(data, stats):
    s_in = baseline_scores(stats, data["in"][1], data["in"][0])
    s_out = baseline_scores(stats, data["out"][1], data["out"][0])
    assert set(s_in) == KEYS
    for name in KEYS:
        assert s_in[name].shape == (150,) and s_in[name].dtype == torch.float64
        assert auroc(s_in[name], s_out[name]) > 0.9, name


def test_knn_matches_brute_force(data, stats):
    train = data["train"][0].double()
    train = train / train.norm(dim=1, keepdim=True)
    for feats in (data["in"][0], data["out"][0], data["train"][0][:50]):
        q = feats.double() / feats.double().norm(dim=1, keepdim=True)
        dist = np.sqrt(((q[:, None, :] - train[None, :, :]) ** 2).sum(-1).numpy())
        expected = np.sort(dist, axis=1)[:, stats.knn_k - 1]
        got = knn_score(stats, feats, chunk_size=7)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_knn_exact_ties():
    # Bank of duplicated points: the k-th distance is well defined whichever duplicate is picked.
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    stats = fit_baselines(bank, torch.zeros(5, 1), torch.ones(1, 2), None, knn_k=3, vim_dim=1)
    got = knn_score(stats, torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-1.0, 0.0]]))
    r2 = math.sqrt(2.0)
    expected = torch.tensor([r2, r2, math.sqrt(2 - r2), r2], dtype=torch.float64)
    torch.testing.assert_close(got, expected)


def numpy_vim(train_feats, train_logits, w, b, dim):
    x, z, w, b = (np.asarray(a, dtype=np.float64) for a in (train_feats, train_logits, w, b))
    u = -np.linalg.pinv(w) @ b
    cov = (x - u).T @ (x - u) / len(x)
    vals, vecs = np.linalg.eigh(cov)
    ns = vecs[:, np.argsort(-vals)[dim:]]
    alpha = z.max(axis=1).mean() / np.linalg.norm((x - u) @ ns, axis=1).mean()
    return u, ns, alpha


def test_vim_matches_numpy(data, stats):
    feats, logits = data["train"]
    u, ns, alpha = numpy_vim(feats, logits, data["weight"], data["bias"], stats.vim_dim)
    assert stats.vim_dim == default_vim_dim(D) == 16
    assert stats.vim_ns.shape == (D, D - 16)
    np.testing.assert_allclose(stats.vim_u.numpy(), u, rtol=1e-6, atol=1e-9)
    assert stats.vim_alpha == pytest.approx(alpha, rel=1e-8)
    # Eigenvectors are defined up to sign / rotation: compare the projectors.
    np.testing.assert_allclose(stats.vim_ns.numpy() @ stats.vim_ns.numpy().T, ns @ ns.T, atol=1e-8)
    # Scores: alpha * ||(f - u) NS|| - logsumexp(z).
    f, z = (a.double().numpy() for a in data["out"])
    expected = alpha * np.linalg.norm((f - u) @ ns, axis=1) - np.log(np.exp(z).sum(axis=1))
    got = baseline_scores(stats, data["out"][1], data["out"][0])["vim"]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8, atol=1e-8)


def test_vim_origin_is_where_logits_vanish(stats, data):
    # For a full-row-rank W, u solves W u + b = 0.
    z_u = data["weight"].double() @ stats.vim_u + data["bias"].double()
    torch.testing.assert_close(z_u, torch.zeros(C, dtype=torch.float64), atol=1e-10, rtol=0)


def test_scores_do_not_depend_on_the_batch(data, stats):
    feats = torch.cat([data["in"][0][:40], data["out"][0][:40]])
    logits = torch.cat([data["in"][1][:40], data["out"][1][:40]])
    batch = baseline_scores(stats, logits, feats)
    perm = torch.randperm(80, generator=torch.Generator().manual_seed(1))
    shuffled = baseline_scores(stats, logits[perm], feats[perm])
    for i in (0, 13, 45, 79):
        alone = baseline_scores(stats, logits[i : i + 1], feats[i : i + 1])
        for name in KEYS:
            torch.testing.assert_close(alone[name][0], batch[name][i], rtol=1e-12, atol=1e-12)
    for name in KEYS:
        torch.testing.assert_close(shuffled[name], batch[name][perm], rtol=1e-12, atol=1e-12)
    chunked = knn_score(stats, feats, chunk_size=3)
    torch.testing.assert_close(chunked, batch["knn"], rtol=1e-12, atol=1e-12)



def test_one_search_gives_each_k_the_distance_of_its_own_search(data, stats):
    """The tuner searches once for the grid's largest k; each k still gets its exact k-th distance."""
    feats = torch.cat([data["in"][0][:40], data["out"][0][:40]])
    ks = [1, 5, 50, 150]
    together = knn_scores(stats, feats, ks, chunk_size=7)
    for k in ks:
        alone = knn_score(dataclasses.replace(stats, knn_k=k), feats)
        assert torch.equal(together[k], alone), k
    assert not torch.equal(together[1], together[150])

def test_state_dict_roundtrip_and_to(data, stats, tmp_path):
    state = stats.state_dict()
    for key, value in state.items():
        assert isinstance(value, (torch.Tensor, int, float)), key
    torch.save(state, tmp_path / "stats.pt")
    loaded = BaselineStats.from_state_dict(torch.load(tmp_path / "stats.pt", weights_only=True))
    moved = loaded.to("cpu")
    assert moved.knn_k == stats.knn_k and moved.vim_dim == stats.vim_dim and moved.vim_alpha == stats.vim_alpha
    a = baseline_scores(stats, data["in"][1], data["in"][0])
    b = baseline_scores(moved, data["in"][1], data["in"][0])
    for name in KEYS:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_gpu_matches_cpu(data, stats):
    cuda = stats.to("cuda")
    a = baseline_scores(stats, data["out"][1], data["out"][0])
    b = baseline_scores(cuda, data["out"][1].cuda(), data["out"][0].cuda())
    for name in KEYS:
        torch.testing.assert_close(b[name].cpu(), a[name], rtol=1e-6, atol=1e-6)


def test_fit_validation(data):
    feats, logits = data["train"]
    w, b = data["weight"], data["bias"]
    with pytest.raises(ValueError, match="knn_k"):
        fit_baselines(feats, logits, w, b, knn_k=0)
    with pytest.raises(ValueError, match="vim_dim"):
        fit_baselines(feats, logits, w, b, vim_dim=D)
    with pytest.raises(ValueError, match="shapes do not fit"):
        fit_baselines(feats, logits, w.T, b)
    with pytest.raises(ValueError, match="head_bias"):
        fit_baselines(feats, logits, w, b[:-1])
    assert default_vim_dim(2048) == 1000 and default_vim_dim(768) == 512 and default_vim_dim(512) == 256


# ---------------------------------------------------------------------------
# Choosing KNN's k and ViM's dim on validation data (OpenOOD v1.5's parameter search)


def clustered(seed: int = 0):
    """A bank where k = 100 is the one good KNN grid value.

    Train: 4 InD clusters of 150 tight points plus one "decoy" cluster of 75 points in another direction.
    InD validation points sit in the InD clusters, OOD validation points in the decoy cluster. For k <= 75
    both find close neighbours; for 75 < k <= 150 only InD does; for k > 150 neither does.
    """
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(5, D, generator=g), dim=1)

    def cluster(i, n):
        return dirs[i] + 0.05 * torch.randn(n, D, generator=g)

    weight, bias = 3 * dirs[:4], torch.zeros(4)
    pair = lambda f: (f @ weight.T + bias, f)  # noqa: E731
    train = torch.cat([cluster(i, 150) for i in range(4)] + [cluster(4, 75)])
    val_ind = pair(torch.cat([cluster(i, 30) for i in range(4)]))
    val_ood = pair(cluster(4, 60))
    return train, pair(train)[0], weight, bias, val_ind, val_ood


def direct_knn_auroc(stats, k, val_ind, val_ood):
    with_k = BaselineStats(stats.knn_bank, k, stats.vim_u, stats.vim_ns, stats.vim_alpha, stats.vim_dim)
    return auroc(knn_score(with_k, val_ind[1]), knn_score(with_k, val_ood[1]))


def test_tuner_picks_the_k_with_the_best_validation_auroc():
    train, logits, w, b, val_ind, val_ood = clustered()
    stats, choice = tune_baselines(train, logits, w, b, val_ind, val_ood)
    knn = choice["knn"]
    assert knn["grid"] == [50, 100, 200, 500] and knn["dropped"] == [1000]  # 1000 > bank size 675
    assert set(knn["val_auroc"]) == {"50", "100", "200", "500"}
    for k in knn["grid"]:
        assert knn["val_auroc"][str(k)] == direct_knn_auroc(stats, k, val_ind, val_ood)
    aurocs = knn["val_auroc"]
    assert knn["k"] == 100 == stats.knn_k  # the construction's answer
    assert aurocs["100"] > max(aurocs[k] for k in ("50", "200", "500"))
    assert choice["validation"] == {"ind": 120, "ood": 60}
    # ViM: every candidate's AUROC is that of a ViM fitted with that dim; the best one is kept.
    vim = choice["vim"]
    assert vim["grid"] == default_vim_grid(D)
    for dim in vim["grid"]:
        fitted = fit_baselines(train, logits, w, b, knn_k=100, vim_dim=dim)
        direct = auroc(vim_score(fitted, *val_ind), vim_score(fitted, *val_ood))
        assert vim["val_auroc"][str(dim)] == pytest.approx(direct, abs=1e-12)
    best = max(vim["val_auroc"].values())
    assert vim["val_auroc"][str(vim["dim"])] == best and stats.vim_dim == vim["dim"]
    assert vim["dim"] == min(int(d) for d, a in vim["val_auroc"].items() if a == best)
    assert stats.vim_ns.shape == (D, D - vim["dim"])


def test_tuner_breaks_ties_towards_the_smaller_value(data):
    # Widely separated synthetic InD / OOD: every k reaches the same validation AUROC.
    feats, logits = data["train"]
    stats, choice = tune_baselines(feats, logits, data["weight"], data["bias"], data["in"][::-1], data["out"][::-1],
                                   knn_grid=[30, 20, 10])
    values = choice["knn"]["val_auroc"]
    assert len(set(values.values())) == 1  # the premise: a tie
    assert choice["knn"]["k"] == 10 == stats.knn_k and choice["knn"]["grid"] == [10, 20, 30]


def test_knn_grid_is_cut_to_the_bank():
    assert knn_grid_for_bank([1000, 50, 200], 300) == [50, 200]
    assert knn_grid_for_bank([50, 100], 30) == [30]


@pytest.mark.parametrize("d", [2, 3, 16, 32, 100, 256, 257, 512, 1024, 1001, 2048, 4096])
def test_vim_grid(d):
    grid = default_vim_grid(d)
    assert grid == sorted(set(grid)) and all(1 <= v < d for v in grid)
    if d > 256:  # OpenOOD's values where they fit below D
        assert grid == [v for v in (256, 1000) if v < d]
    else:  # the same ratios to D as OpenOOD's to ResNet-50's 2048, up to rounding and the clip to [1, D - 1]
        expected = {min(max(round(d * r / 2048), 1), d - 1) for r in (256, 1000)}
        assert set(grid) == expected
        for v, r in zip(sorted(expected), (256, 1000)):
            assert abs(v - d * r / 2048) <= 0.5 or v in (1, d - 1)


def test_vim_grid_examples():
    # 32 * 256 / 2048 = 4 and 32 * 1000 / 2048 = 15.625; 512 only fits 256; ResNet-50's 2048 fits both.
    assert default_vim_grid(32) == [4, 16]
    assert default_vim_grid(512) == [256] and default_vim_grid(2048) == [256, 1000]
    with pytest.raises(ValueError, match="feature dimension >= 2"):
        default_vim_grid(1)


@pytest.mark.parametrize("missing", ["none", "empty"])
def test_fixed_values_without_ood_validation_data(missing):
    train, logits, w, b, val_ind, val_ood = clustered()
    no_ood = None if missing == "none" else (val_ood[0][:0], val_ood[1][:0])
    stats, choice = tune_baselines(train, logits, w, b, val_ind, no_ood)
    assert stats.knn_k == choice["knn"]["k"] == 50
    assert stats.vim_dim == choice["vim"]["dim"] == default_vim_dim(D)
    for name in ("knn", "vim"):
        assert choice[name]["reason"] == "no OOD validation data: fixed values"
        assert choice[name]["val_auroc"] == {}
    assert choice["validation"] == {"ind": 120, "ood": 0}
    # A bank smaller than 50: k is capped at its size.
    small, _ = tune_baselines(train[:30], logits[:30], w, b, val_ind, None)
    assert small.knn_k == 30


def test_explicit_config_values_are_respected():
    train, logits, w, b, val_ind, val_ood = clustered()
    stats, choice = tune_baselines(train, logits, w, b, val_ind, val_ood, knn_k=7, vim_dim=5)
    assert (stats.knn_k, stats.vim_dim) == (7, 5) and stats.vim_ns.shape == (D, D - 5)
    assert choice["knn"]["reason"] == "fixed by config (baselines.knn_k)"
    assert choice["vim"]["reason"] == "fixed by config (baselines.vim_dim)"
    assert choice["knn"]["val_auroc"] == {"7": direct_knn_auroc(stats, 7, val_ind, val_ood)}
    # One fixed, the other tuned.
    stats, choice = tune_baselines(train, logits, w, b, val_ind, val_ood, knn_k=7)
    assert stats.knn_k == 7 and choice["vim"]["reason"].startswith("best validation AUROC")
    with pytest.raises(ValueError, match=r"baselines.knn_k=700 .*\[1, 675\]"):
        tune_baselines(train, logits, w, b, val_ind, val_ood, knn_k=700)
    with pytest.raises(ValueError, match=r"baselines.vim_dim=32 .*\[1, 31\]"):
        tune_baselines(train, logits, w, b, val_ind, val_ood, vim_dim=D)
    with pytest.raises(ValueError, match="baselines.vim_dim_grid"):
        tune_baselines(train, logits, w, b, val_ind, val_ood, vim_grid=[D, 2 * D])


def test_baseline_config():
    cfg = BaselineConfig()
    assert cfg.knn_k is None and cfg.vim_dim is None and cfg.vim_dim_grid is None
    assert cfg.knn_k_grid == [50, 100, 200, 500, 1000]
    with pytest.raises(ConfigError, match="baselines.knn_k=0"):
        BaselineConfig(knn_k=0)
    with pytest.raises(ConfigError, match="baselines.knn_k_grid"):
        BaselineConfig(knn_k_grid=[])
    with pytest.raises(ConfigError, match="baselines.vim_dim_grid"):
        BaselineConfig(vim_dim_grid=[0, 4])


class Poisoned(torch.utils.data.Dataset):
    """A test split that must never be read."""

    def __len__(self):
        return 5

    def __getitem__(self, index):
        raise AssertionError("a test split was read while fitting the baselines")


def test_classifier_baselines_tuned_on_validation_splits_only(benchmark):
    from diffguard_pl.config import EvalConfig
    from diffguard_pl.data.benchmark import Benchmark, OODSet
    from diffguard_pl.jobs.eval_data import fit_classifier_baselines
    from diffguard_pl.models import ClassifierSpec, build_classifier

    torch.manual_seed(0)
    spec = ClassifierSpec("diffguard_resnet_tiny", num_classes=6, in_chans=1, input_size=16, mean=[0.5], std=[0.5])
    classifier = build_classifier(spec).eval()
    names = list(benchmark.ood)
    ood = {name: OODSet(s.group, s.val.subset(range(10)), Poisoned()) for name, s in benchmark.ood.items()}
    ood[names[0]] = OODSet(ood[names[0]].group, benchmark.ood[names[0]].val.subset([]), Poisoned())  # empty val
    small = Benchmark(benchmark.name, benchmark.num_classes, benchmark.channels, benchmark.resolution,
                      benchmark.train.subset(range(120)), benchmark.val.subset(range(40)), Poisoned(), ood)
    cfg = EvalConfig()
    stats, choice = fit_classifier_baselines(classifier, small, cfg)
    assert choice["validation"] == {"ind": 40, "ood": 10 * (len(names) - 1)}
    assert choice["knn"]["grid"] == [50, 100] and stats.knn_k == choice["knn"]["k"]
    assert stats.knn_bank.shape[0] == 120
    # Explicit values from the config, and no OOD validation at all.
    cfg.baselines.knn_k, cfg.baselines.vim_dim = 3, 2
    no_ood = Benchmark(small.name, small.num_classes, small.channels, small.resolution, small.train, small.val,
                       Poisoned(), {name: OODSet(s.group, s.val.subset([]), Poisoned()) for name, s in ood.items()})
    stats, choice = fit_classifier_baselines(classifier, no_ood, cfg)
    assert (stats.knn_k, stats.vim_dim) == (3, 2) and choice["knn"]["reason"] == "fixed by config (baselines.knn_k)"
    assert choice["validation"] == {"ind": 40, "ood": 0}
