import pytest
import torch

from diffguard_pl.method.ddim import alpha_bar, coefficient_table, ddim_sample, ddim_step, predict_x0, spaced_timesteps, step_coefficients

ALPHAS = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)


def test_spaced_timesteps():
    assert spaced_timesteps(1000, 100)[:3].tolist() == [0, 10, 20]
    assert spaced_timesteps(1000, 100)[-1] == 990
    assert len(spaced_timesteps(1000, 50)) == 50
    with pytest.raises(ValueError, match="num_steps"):
        spaced_timesteps(1000, 0)


def test_alpha_bar_level_minus_one_is_clean():
    assert alpha_bar(ALPHAS, torch.tensor([-1, 0, 999])).tolist() == [1.0, ALPHAS[0].item(), ALPHAS[-1].item()]


def test_inversion_step_matches_equation():
    x, eps = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    a_t, a_next = torch.tensor([0.9, 0.5], dtype=torch.float64), torch.tensor([0.8, 0.3], dtype=torch.float64)
    got = ddim_step(x, eps, a_t, a_next)
    for i in range(2):
        want = a_next[i].sqrt() * (x[i] - (1 - a_t[i]).sqrt() * eps[i]) / a_t[i].sqrt() + (1 - a_next[i]).sqrt() * eps[i]
        assert torch.allclose(got[i], want)


def test_step_is_exact_for_a_consistent_eps():
    # If eps is the true noise, stepping any direction lands exactly on the same trajectory.
    x0, noise = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    a_t, a_s = torch.tensor([0.7, 0.7, 0.7], dtype=torch.float64), torch.tensor([0.2, 0.9, 1.0], dtype=torch.float64)
    x_t = a_t.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a_t).sqrt().view(-1, 1, 1, 1) * noise
    want = a_s.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a_s).sqrt().view(-1, 1, 1, 1) * noise
    assert torch.allclose(ddim_step(x_t, noise, a_t, a_s), want)
    assert torch.allclose(predict_x0(x_t, noise, a_t), x0)


def test_sample_with_oracle_eps_recovers_image():
    # eps_fn that knows x0: the deterministic sampler must land on x0 exactly.
    x0 = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    steps = spaced_timesteps(1000, 20)

    def eps_fn(x, t):
        a = alpha_bar(ALPHAS, t).view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    noise = torch.randn_like(x0)
    a_T = ALPHAS[steps[-1]]
    x_T = a_T.sqrt() * x0 + (1 - a_T).sqrt() * noise
    assert torch.allclose(ddim_sample(eps_fn, ALPHAS, x_T, steps), x0, atol=1e-10)


def test_clipped_step_keeps_x0_in_range_and_is_plain_when_inside():
    x0 = torch.rand(2, 1, 4, 4, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    a_t, a_s = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.9, 1.0], dtype=torch.float64)
    x_t = a_t.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a_t).sqrt().view(-1, 1, 1, 1) * noise
    assert torch.allclose(ddim_step(x_t, noise, a_t, a_s, clip_x0=True), ddim_step(x_t, noise, a_t, a_s))
    far = ddim_step(x_t, noise - 3.0, a_t, torch.ones(2, dtype=torch.float64), clip_x0=True)  # lands on x0
    assert far.abs().max() <= 1.0 + 1e-12
    clean = torch.ones(2, dtype=torch.float64)  # from the clean level, eps plays no role
    assert torch.allclose(ddim_step(x0, noise, clean, a_t, clip_x0=True), ddim_step(x0, noise, clean, a_t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clip", [False, True])
def test_precomputed_coefficients_give_the_same_step_to_the_bit(dtype, clip):
    """The pipeline builds the step coefficients of every level once per run; steps from that table must equal
    steps computed from alpha_bar, bit for bit (also at the clean level, where clipping keeps eps)."""
    levels = torch.tensor([-1, 0, 10, 500, 999])
    alphas = alpha_bar(ALPHAS, levels)
    table = tuple(c.to(dtype) for c in coefficient_table(alphas))
    x, eps = torch.randn(3, 2, 4, 4, dtype=dtype) * 2, torch.randn(3, 2, 4, 4, dtype=dtype)
    for t, s in ((1, 0), (0, 1), (3, 2), (2, 4), (4, 3)):
        coef_t = tuple(c[t].view(1, 1, 1, 1) for c in table)
        coef_s = tuple(c[s].view(1, 1, 1, 1) for c in table)
        assert torch.equal(coef_t[0], step_coefficients(alphas[t : t + 1], x)[0])
        want = ddim_step(x, eps, alphas[t : t + 1], alphas[s : s + 1], clip)
        assert torch.equal(ddim_step(x, eps, None, None, clip, coef_t, coef_s), want)
        assert torch.equal(predict_x0(x, eps, None, coef_t), predict_x0(x, eps, alphas[t : t + 1]))
    if clip:  # at the clean level (a = 1) the clipped step keeps the given eps
        clean = ddim_step(x, eps, alphas[:1], alphas[1:2], True)
        x0 = x.clamp(-1, 1)
        assert torch.allclose(clean, alphas[1].sqrt().to(dtype) * x0 + (1 - alphas[1]).sqrt().to(dtype) * eps)
