"""Pixel distances: the SSIM of diffguard_pl.method.scores against piq's, which it replaces on the per-step path."""

import piq
import pytest
import torch

from diffguard_pl.method.scores import pixel_distances, ssim


def piq_ssim(x, y):
    side = min(x.shape[-2:])
    kernel = min(11, side - (1 - side % 2))
    return piq.ssim(x, y, data_range=1.0, reduction="none", kernel_size=kernel, downsample=False)


@pytest.mark.parametrize("shape", [(3, 1, 16, 16), (2, 3, 32, 32), (2, 3, 64, 48), (1, 3, 8, 8), (2, 1, 7, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ssim_equals_piq(shape, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.rand(shape, generator=g, dtype=dtype)
    y = (x + 0.2 * torch.randn(shape, generator=g, dtype=dtype)).clamp(0, 1)
    ours, reference = ssim(x, y), piq_ssim(x, y)
    assert ours.shape == (shape[0],) and ours.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(ours, reference, atol=tolerance, rtol=0), (ours - reference).abs().max()
    assert torch.allclose(ssim(x, x), torch.ones(shape[0], dtype=dtype), atol=tolerance)
    assert (ours < 1).all()


@pytest.mark.exactness
def test_ssim_per_sample_does_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(5, 3, 16, 16, generator=g, dtype=torch.float64), torch.rand(5, 3, 16, 16, generator=g,
                                                                                 dtype=torch.float64)
    together = ssim(x, y)
    alone = torch.cat([ssim(x[i : i + 1], y[i : i + 1]) for i in range(5)])
    assert torch.allclose(together, alone, rtol=0, atol=1e-15)


def test_ssim_distance_is_one_minus_ssim():
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 1, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g)
    assert torch.allclose(pixel_distances(x, y, ["ssim"])["ssim"], 1 - piq_ssim(x, y), atol=1e-5)
