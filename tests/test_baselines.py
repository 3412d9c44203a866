import math

import numpy as np
import pytest
import torch

from diffguard_pl.baselines import (
    BaselineStats,
    baseline_scores,
    default_vim_dim,
    energy,
    fit_baselines,
    knn_score,
    max_logit,
    msp,
)
from diffguard_pl.metrics import auroc

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
