"""LMD (Lift, Map, Detect): checkerboard masks, RePaint-style DDIM inpainting, median distances over repetitions."""

import numpy as np
import pytest
import torch

from diffguard_pl.method import lmd
from diffguard_pl.models import load_diffusion
from diffguard_pl.seeding import sample_seed

from helpers.models import small_diffusion
from helpers.paths import CHECKPOINTS


def authors_mask(image_size, num_blocks, inverted):
    """mask_utils.get_checkerboard_mask of the authors' code, rewritten: 1 = known."""
    mask = torch.ones(num_blocks, num_blocks)
    if inverted:
        mask[::2, ::2] = 0.0
        mask[1::2, 1::2] = 0.0
    else:
        mask[1::2, ::2] = 0.0
        mask[::2, 1::2] = 0.0
    block = image_size // num_blocks
    return mask.repeat_interleave(block, 0).repeat_interleave(block, 1)


def test_masks_are_the_authors_alternating_checkerboards():
    masks = lmd.checkerboard_masks(32, 4, 4)  # their README's run: 8 blocks of 4 pixels on 32 x 32
    assert masks.shape == (4, 1, 32, 32)
    for r in range(4):
        assert torch.equal(masks[r, 0], authors_mask(32, 8, inverted=r % 2 == 1))
    assert torch.equal(masks[0] + masks[1], torch.ones(1, 32, 32))  # consecutive repetitions: complementary halves
    assert float(masks.mean()) == 0.5
    odd = lmd.checkerboard_masks(28, 8, 1)[0, 0]  # partial squares at the far edges
    assert odd[0, 0] == 1 and odd[0, 8] == 0 and odd[24, 24] == 1 and odd[27, 16] == 0 and odd[27, 27] == 1
    with pytest.raises(ValueError, match="square"):
        lmd.checkerboard_masks(16, 16, 2)
    with pytest.raises(ValueError, match="repetitions"):
        lmd.checkerboard_masks(16, 4, 0)


@torch.no_grad()
def reference_scores(unet, alphas, images, ids, repetitions, num_steps, square, seed):
    """LMD one sample and one repetition at a time, from the equations (float64): the known pixels replaced by
    the input noised to a_k before each eps(x_k, t_k), the DDIM step x_{k-1} = sqrt(a_{k-1}) x0_pred +
    sqrt(1 - a_{k-1}) eps with x0_pred = (x_k - sqrt(1 - a_k) eps) / sqrt(a_k), the known pixels of the result
    the input itself, MSE on [0, 1], then np.median over repetitions."""
    size, stride = images.shape[-1], len(alphas) // num_steps
    timesteps = [None] + [(k - 1) * stride for k in range(1, num_steps + 1)]
    a = [1.0] + [float(alphas[t]) for t in timesteps[1:]]
    scores = []
    for image, sample_id in zip(images, ids):
        x0, per_rep = image[None] * 2 - 1, []
        for r in range(repetitions):
            m = authors_mask(size, size // square, inverted=r % 2 == 1).double()
            g = torch.Generator().manual_seed(sample_seed(f"{sample_id}:lmd{r}", seed + lmd.SALT))
            x = torch.randn(x0.shape[1:], generator=g, dtype=torch.float64)[None]
            for k in range(num_steps, 0, -1):
                noised = a[k] ** 0.5 * x0 + (1 - a[k]) ** 0.5 * torch.randn(x0.shape[1:], generator=g,
                                                                              dtype=torch.float64)[None]
                x = m * noised + (1 - m) * x
                eps = unet(x, torch.tensor([timesteps[k]])).sample
                x0_pred = (x - (1 - a[k]) ** 0.5 * eps) / a[k] ** 0.5
                x = a[k - 1] ** 0.5 * x0_pred + (1 - a[k - 1]) ** 0.5 * eps
            out = ((m * x0 + (1 - m) * x + 1) / 2).clamp(0, 1)
            per_rep.append(float((out - image[None]).pow(2).mean()))
        scores.append(np.median(per_rep))
    return torch.tensor(scores, dtype=torch.float64)


@pytest.fixture(scope="module")
def model64():
    diffusion = small_diffusion()
    diffusion.unet.double()
    return diffusion


def test_batched_scores_equal_a_per_sample_loop_from_the_equations(model64):
    images = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    ids = ["a", "b", "c"]
    # 4 repetitions: an even count, so the median is the mean of the two middle values (np.median)
    got = lmd.lmd_scores(model64, images, ids, repetitions=4, num_steps=5, square=4, seed=3)["mse"]
    want = reference_scores(model64.unet, model64.alphas_cumprod, images, ids, 4, 5, 4, seed=3)
    assert got.dtype == torch.float64 and got.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)


def test_scores_do_not_depend_on_batch_or_order_but_on_ids_and_seed(model64):
    images = torch.rand(6, 1, 16, 16, dtype=torch.float64)
    ids = [f"s{i}" for i in range(6)]

    def scores(x, names, seed=0):
        return lmd.lmd_scores(model64, x, names, repetitions=2, num_steps=4, square=2, seed=seed)["mse"]

    batch = scores(images, ids)
    alone = torch.cat([scores(images[i:i + 1], ids[i:i + 1]) for i in range(6)])
    reversed_ = scores(images.flip(0), ids[::-1]).flip(0)
    torch.testing.assert_close(alone, batch, rtol=1e-9, atol=0)
    torch.testing.assert_close(reversed_, batch, rtol=1e-9, atol=0)
    assert torch.equal(scores(images, ids), batch)  # no fitting, no hidden state: the same call, the same numbers
    renamed = scores(images, [f"t{i}" for i in range(6)])
    reseeded = scores(images, ids, seed=1)
    assert ((renamed - batch).abs() > 1e-6).all() and ((reseeded - batch).abs() > 1e-6).all()


def test_inpainting_keeps_the_known_pixels_and_costs_one_eval_per_step(model64):
    images = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    mask = lmd.checkerboard_masks(16, 4, 2)[1]
    calls = []
    eps = model64.eps
    model64.eps = lambda x, t: calls.append(x.shape[0]) or eps(x, t)
    try:
        out = lmd.inpaint(model64, images, ["a", "b"], mask, num_steps=6, seed=0, repetition=1)
        lmd.lmd_scores(model64, images, ["a", "b"], repetitions=3, num_steps=6, square=4)
    finally:
        del model64.eps
    assert torch.equal(out * mask, images * mask)  # known pixels: the input itself
    assert ((out - images).abs() * (1 - mask)).sum() > 0 and 0 <= float(out.min()) and float(out.max()) <= 1
    assert sum(calls) == 2 * 6 + 2 * lmd.unet_evals(3, 6)  # rows evaluated: one per image and step
    with pytest.raises(ValueError, match="mask side"):
        lmd.inpaint(model64, images, ["a", "b"], lmd.checkerboard_masks(8, 2, 1)[0], 2, 0, 0)
    with pytest.raises(ValueError, match="one id per image"):
        lmd.inpaint(model64, images, ["a"], mask, 2, 0, 0)


def test_feature_distance_is_the_median_of_one_minus_cosine(model64):
    images = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    ids = ["a", "b"]
    scores = lmd.lmd_scores(model64, images, ids, 2, 3, 4, features=lambda x: x.flatten(1))
    masks = lmd.checkerboard_masks(16, 4, 2)
    outs = [lmd.inpaint(model64, images, ids, masks[r], 3, 0, r) for r in range(2)]
    cos = torch.stack([torch.cosine_similarity(images.flatten(1), o.flatten(1), dim=1) for o in outs])
    torch.testing.assert_close(scores["features"], (1 - cos).mean(0), rtol=1e-12, atol=1e-15)  # median of 2
    assert set(scores) == {"mse", "features"}


def test_trained_digits_model_scores_noise_and_constant_images_above_ind_digits(benchmark):
    diffusion = load_diffusion(CHECKPOINTS / "diffusion_uncond")
    sets = {"ind": (benchmark.val.images[:6], benchmark.val.ids[:6])}
    for name in ("noise", "constant"):
        sets[name] = (benchmark.ood[name].test.images[:6], benchmark.ood[name].test.ids[:6])
    scores = {name: lmd.lmd_scores(diffusion, x, list(ids), repetitions=2, num_steps=10, square=4)["mse"]
              for name, (x, ids) in sets.items()}
    # measured (10 steps, 4-pixel squares, 2 repetitions): InD 0.0045 to 0.0204, constant 0.026 to 0.041,
    # noise 0.038 to 0.059
    for name in ("noise", "constant"):
        assert scores[name].min() > scores["ind"].max(), (name, scores)
