"""LMD, "Lift, Map, Detect" (Liu et al., ICML 2023): OOD detection by diffusion inpainting, no fitting.

Lift: hide half of the image behind a checkerboard mask. Map: let the unconditional diffusion model inpaint the
hidden squares from the visible ones; an InD image comes back close to itself, an OOD image is pulled towards
the InD manifold and comes back changed. Detect: the distance between the input and its inpainting, the median
over repetitions with alternating masks (higher = more OOD).

What follows the authors' code (github.com/zhenzhel/lift_map_detect):

- masks (``mask_utils.get_checkerboard_mask``, ``mask_type=checkerboard_alt``): squares of ``square`` pixels
  (theirs: ``image_size / num_blocks``, 32 / 8 = 4 pixels in their README's run); square (i, j) is known when
  i + j is even on even repetitions and when it is odd on odd ones (``maskgen_offset`` = the repetition), so
  two consecutive repetitions hide complementary halves;
- inpainting (``controllable_generation.get_pc_inpainter``): the hidden pixels start from pure noise; before
  every denoiser evaluation the known pixels are replaced by the input forward-noised to the current level with
  fresh noise (their replacement runs before and after each predictor step, so the model always sees the input
  noised to the level it evaluates); the known pixels of the result are the input itself;
- scores (``detect.py``): the distance per repetition, then ``np.median`` over repetitions, which averages the
  two middle values for an even count (their default: 10 repetitions) — so does :func:`median`.

What differs, and why: their sampler is the sub-VP SDE's Euler-Maruyama predictor over 1,000 steps; this one
is the project's deterministic DDIM (:mod:`diffguard_pl.method.ddim`, eta = 0) on ``num_steps`` spaced steps of
the model's DDPM schedule (the randomness left is the known pixels' noise and the hidden pixels' start). Their
default distance is LPIPS (AlexNet); here ``mse`` on [0, 1] images (their ``MSE`` metric) and, with a
``features`` callable, one minus the cosine similarity of its features (their ``SIMCLR`` metric is the cosine
similarity, oriented there the other way round). Inpaintings are clamped to [0, 1] as the project's images are
(theirs are not). For a latent model the mask covers the denoiser's latent cells (``square`` counts those) and
the distance reads the decoded inpainting.

Randomness: each sample and repetition draws from its own generator, seeded from the sample id
(:func:`diffguard_pl.seeding.sample_seed`), so a score does not depend on the batch, the order or the process.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from diffguard_pl.method.ddim import Ladder, ddim_step, step_coefficients
from diffguard_pl.method.pipeline import check_images
from diffguard_pl.models import DiffusionModel
from diffguard_pl.seeding import sample_seed

SALT = 3079  # separates LMD's draws from every other per-sample generator
Features = Callable[[torch.Tensor], torch.Tensor]


def checkerboard_masks(size: int, square: int, repetitions: int) -> torch.Tensor:
    """Masks [R, 1, size, size] (float32, 1 = known / kept, 0 = inpainted) of the R repetitions.

    Square (i, j) = pixels [i * square, (i + 1) * square) x [j * square, (j + 1) * square) is known when
    (i + j + r) is even: the authors' ``checkerboard_alt`` (not inverted on even repetitions, inverted on odd
    ones). A ``size`` that ``square`` does not divide keeps partial squares at the far edges (their code
    refuses it).
    """
    if size < 2 or not 1 <= square < size:
        raise ValueError(f"square={square} must lie in [1, {size - 1}] for {size}-pixel images, so that both "
                         f"kinds of square occur (the authors' run: 4 pixels of 32)")
    if repetitions < 1:
        raise ValueError(f"repetitions={repetitions} must be at least 1 (the authors' default: 10)")
    cells = torch.arange(size) // square
    parity = cells.view(-1, 1) + cells.view(1, -1)
    r = torch.arange(repetitions).view(-1, 1, 1)
    return ((parity + r) % 2 == 0).to(torch.float32).unsqueeze(1)


def unet_evals(repetitions: int, num_steps: int) -> int:
    """Denoiser evaluations per image: one per DDIM step of every repetition's inpainting."""
    return repetitions * num_steps


def _generators(ids: Sequence[str], seed: int, repetition: int) -> List[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(f"{sample_id}:lmd{repetition}", seed + SALT))
            for sample_id in ids]


def _draw(generators: List[torch.Generator], like: torch.Tensor) -> torch.Tensor:
    """One standard normal draw [N, ...] per sample from its own generator, drawn in float64 (the same numbers
    whatever the dtype of the run) and cast to ``like``'s dtype and device."""
    shape = tuple(like.shape[1:])
    noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in generators])
    return noise.to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def inpaint(diffusion: DiffusionModel, images: torch.Tensor, ids: Sequence[str], mask: torch.Tensor,
            num_steps: int, seed: int, repetition: int) -> torch.Tensor:
    """The inpainting [N, C, H, W] in [0, 1] of ``images`` ([N, C, H, W] in [0, 1]) under ``mask``.

    ``mask``: [H', W'], [1, H', W'] or [N or 1, 1, H', W'] at the denoiser's side (1 = known). With a_k the
    alpha_bar of level k of the symmetric DDIM ladder (level 0: the clean image, level K = ``num_steps``: the
    last spaced timestep) and x0 the input in model space:

        x_K = n_K                                          (the hidden pixels start from pure noise)
        for k = K .. 1:
            x_k <- m * (sqrt(a_k) x0 + sqrt(1 - a_k) n'_k) + (1 - m) * x_k   (RePaint's replacement)
            x_{k-1} = DDIM step of x_k with eps(x_k, t_k)
        result = m * x0 + (1 - m) * x_0

    Every noise n comes from the generator of (sample id, ``seed``, ``repetition``), drawn in the order above.
    """
    check_images(images)
    if len(ids) != images.shape[0]:
        raise ValueError(f"{len(ids)} ids for {images.shape[0]} images: pass one id per image")
    x0 = diffusion.encode(images * 2 - 1).to(images.dtype)
    mask = mask.to(device=x0.device, dtype=x0.dtype)
    mask = mask.view(1, 1, *mask.shape[-2:]) if mask.ndim < 4 else mask
    if tuple(mask.shape[-2:]) != tuple(x0.shape[-2:]):
        raise ValueError(f"mask side {tuple(mask.shape[-2:])} differs from the denoiser's {tuple(x0.shape[-2:])}: "
                         f"build it with checkerboard_masks(diffusion.sample_size, ...)")
    ladder = Ladder.build(diffusion.alphas_cumprod, num_steps)
    generators = _generators(ids, seed, repetition)
    x = _draw(generators, x0)
    coef_s = step_coefficients(ladder.alphas[num_steps:num_steps + 1], x0)
    for k in range(num_steps, 0, -1):
        coef_t, coef_s = coef_s, step_coefficients(ladder.alphas[k - 1:k], x0)
        root_a, root_1ma = coef_t[:2]
        x = mask * (root_a * x0 + root_1ma * _draw(generators, x0)) + (1 - mask) * x
        t = torch.full((x.shape[0],), int(ladder.timesteps[k]), dtype=torch.long, device=x.device)
        eps = diffusion.eps(x, t).to(x.dtype)
        x = ddim_step(x, eps, None, None, coef_t=coef_t, coef_s=coef_s)
    x = mask * x0 + (1 - mask) * x
    return ((diffusion.decode(x).to(images.dtype) + 1) / 2).clamp(0, 1)


def median(values: torch.Tensor) -> torch.Tensor:
    """The median over dim 0, as ``np.median``: the mean of the two middle values for an even count
    (``torch.median`` would take the lower one)."""
    return torch.quantile(values.to(torch.float64), 0.5, dim=0)


def mse(images: torch.Tensor, inpainted: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample of [0, 1] images, in float64 (their ``MSE`` metric)."""
    return (inpainted.to(torch.float64) - images.to(torch.float64)).pow(2).flatten(1).mean(dim=1)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a, b) per row of features [N, D], in float64 (0 = same direction, up to 2)."""
    a, b = a.to(torch.float64).flatten(1), b.to(torch.float64).flatten(1)
    return 1 - torch.nn.functional.cosine_similarity(a, b, dim=1)


def lmd_scores(diffusion: DiffusionModel, images: torch.Tensor, ids: Sequence[str], repetitions: int,
               num_steps: int, square: int, seed: int = 0, features: Optional[Features] = None
               ) -> Dict[str, torch.Tensor]:
    """LMD scores [N] (float64, CPU, higher = more OOD) of ``images`` [N, C, H, W] in [0, 1].

    ``mse``: the median over the ``repetitions`` alternating checkerboard masks (squares of ``square``
    denoiser pixels) of the mean squared difference between the input and its inpainting
    (:func:`inpaint`, ``num_steps`` DDIM steps). With ``features`` (images [N, C, H, W] in [0, 1] ->
    [N, D]) also ``features``: the median of 1 - cos between the features of the input and of the
    inpainting. Costs :func:`unet_evals` ``(repetitions, num_steps)`` denoiser evaluations per image.
    """
    check_images(images)
    masks = checkerboard_masks(diffusion.sample_size, square, repetitions)
    reference = features(images) if features is not None else None
    per_rep: Dict[str, List[torch.Tensor]] = {"mse": [], "features": []}
    for r in range(repetitions):
        inpainted = inpaint(diffusion, images, ids, masks[r], num_steps, seed, r)
        per_rep["mse"].append(mse(images, inpainted))
        if reference is not None:
            per_rep["features"].append(cosine_distance(reference, features(inpainted)))
    return {name: median(torch.stack(values)).cpu() for name, values in per_rep.items() if values}
