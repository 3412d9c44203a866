"""Does a class-conditional diffusion model draw the class it is asked for?

Samples ``per_class`` images per class with deterministic DDIM (predicted x0
clipped to [-1, 1] at each step, as guided-diffusion's ``clip_denoised``;
``--no-clip`` turns that off), starting from noise seeded by each sample's id,
and reports how often the classifier predicts the requested class:

    python -m diffguard_pl.jobs.sample_check checkpoints/digits/diffusion_cond checkpoints/digits/classifier
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

import torch

from diffguard_pl.seeding import sample_seed
from diffguard_pl.method.ddim import ddim_sample, spaced_timesteps
from diffguard_pl.method.guidance import classifier_free_eps
from diffguard_pl.models import Classifier, DiffusionModel, load_classifier, load_diffusion


def seeded_noise(ids: list[str], shape: tuple, seed: int = 0) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(i, seed))) for i in ids])


def classifier_free_eps_fn(model: DiffusionModel, labels: torch.Tensor, guidance_scale: float):
    """eps = eps_u + w (eps_c - eps_u); w = 1 is the plain conditional model (one forward)."""

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance_scale == 1.0:
            return model.eps(x, t, labels)
        if model.null_class is None:
            raise ValueError("guidance_scale != 1 needs a null class, and this model has none; use 1")
        null = torch.full_like(labels, model.null_class)
        both = model.eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        eps_c, eps_u = both.chunk(2)
        return classifier_free_eps(eps_c, eps_u, guidance_scale)

    return eps_fn


@torch.no_grad()
def conditional_sample_accuracy(
    model: DiffusionModel,
    classifier: Classifier,
    per_class: int = 50,
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    return_images: bool = False,
    clip_x0: bool = True,
) -> dict:
    if not model.conditional:
        raise ValueError("conditional_sample_accuracy needs a class-conditional diffusion model")
    shape = (model.in_channels, model.sample_size, model.sample_size)
    timesteps = spaced_timesteps(model.num_train_timesteps, num_steps)
    labels = torch.arange(model.num_classes).repeat_interleave(per_class)
    ids = [f"sample/{int(c)}/{k % per_class}" for k, c in enumerate(labels)]
    preds, images = [], []
    for start in range(0, len(labels), batch_size):
        y = labels[start : start + batch_size]
        x_T = seeded_noise(ids[start : start + batch_size], shape, seed)
        eps_fn = classifier_free_eps_fn(model, y, guidance_scale)
        x0 = ddim_sample(eps_fn, model.alphas_cumprod, x_T, timesteps, clip_x0=clip_x0)
        x01 = ((x0 + 1) / 2).clamp(0, 1)
        preds.append(classifier(x01).argmax(dim=1))
        if return_images:
            images.append(x01)
    pred = torch.cat(preds)
    per = {int(c): float((pred[labels == c] == c).float().mean()) for c in range(model.num_classes)}
    result = {"accuracy": float((pred == labels).float().mean()), "per_class": per, "num_samples": len(labels),
              "num_steps": num_steps, "guidance_scale": guidance_scale, "clip_x0": clip_x0}
    if return_images:
        result["images"], result["labels"] = torch.cat(images), labels
    return result


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("diffusion", help="class-conditional diffusers folder")
    parser.add_argument("classifier", help="portable classifier folder")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1] at each step")
    parser.add_argument("--grid", help="write a PNG grid of the samples (one row per class) here")
    args = parser.parse_args(argv)
    result = conditional_sample_accuracy(
        load_diffusion(args.diffusion), load_classifier(args.classifier), args.per_class, args.steps,
        args.guidance_scale, args.seed, return_images=bool(args.grid), clip_x0=not args.no_clip,
    )
    if args.grid:
        from torchvision.utils import save_image

        per = args.per_class
        picked = result["images"].view(-1, per, *result["images"].shape[1:])[:, : min(per, 16)]
        save_image(picked.flatten(0, 1), args.grid, nrow=picked.shape[1], padding=1)
    result.pop("images", None), result.pop("labels", None)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
