"""Convert OpenAI guided-diffusion (ADM) ``UNetModel`` checkpoints into diffusers ``UNet2DModel`` folders.

Command line (the architecture flags are guided-diffusion's ``MODEL_FLAGS``, with the same defaults)::

    python -m diffguard_pl.models.convert adm 256x256_diffusion_uncond.pt OUT_DIR \\
        --image_size 256 --num_channels 256 --num_res_blocks 2 --attention_resolutions 32,16,8 \\
        --num_head_channels 64 --learn_sigma True --class_cond False --resblock_updown True \\
        --use_scale_shift_norm True --use_fp16 True

``OUT_DIR`` becomes a diffusers pipeline folder that ``diffguard_pl.models.load_diffusion`` reads:
``unet/`` (safetensors), ``scheduler/`` (ADM's beta schedule), ``model_index.json``, ``diffguard.json``
(``num_classes`` = N for a class-conditional model, ``null_class`` = null: ADM has no null-class row) and
``adm_config.json`` (the UNetModel arguments used, for provenance).

The architecture mapping (which ADM tensor becomes which diffusers tensor, what is refused):
:mod:`diffguard_pl.models.adm_layout`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffguard_pl.models.adm_layout import (  # noqa: F401  (ConversionError and the config helpers: public here too)
    FLAG_DEFAULTS,
    ConversionError,
    _Leaf,
    _leaves,
    _str2bool,
    adm_config_from_flags,
    diffusers_unet_config,
    normalize_adm_config,
)
from diffguard_pl.models.diffusion import META_FILE

ADM_CONFIG_FILE = "adm_config.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


# ------------------------------------------------------------------------------------- state dicts


def _split_qkv(tensor: torch.Tensor, heads: int, new_order: bool) -> tuple[torch.Tensor, ...]:
    """ADM's fused qkv conv weight [3C, C, 1] or bias [3C] -> q, k, v ([C, C] or [C])."""
    width = tensor.shape[0] // 3
    flat = tensor.reshape(3 * width, -1)
    grid = flat.reshape(3, heads, width // heads, -1) if new_order else flat.reshape(heads, 3, width // heads, -1)
    pieces = grid.unbind(0) if new_order else grid.unbind(1)
    shape = (width, *tensor.shape[1:-1])
    return tuple(p.clone(memory_format=torch.contiguous_format).reshape(shape) for p in pieces)


def _expected_shape(leaf: _Leaf, shapes: Mapping[str, torch.Size]) -> tuple[int, ...]:
    """The ADM shape of ``leaf`` implied by the diffusers model's shapes."""
    target = tuple(shapes[leaf.diffusers[0]])
    if leaf.op == "squeeze":
        return (*target, 1)
    if leaf.op == "qkv":
        return (3 * target[0], *target[1:], 1) if len(target) == 2 else (3 * target[0],)
    return target


def _sample(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _check_keys(state_dict: Mapping[str, torch.Tensor], leaves: Sequence[_Leaf]) -> None:
    expected = {leaf.adm for leaf in leaves}
    missing, unexpected = expected - set(state_dict), set(state_dict) - expected
    if not missing and not unexpected:
        return
    lines = ["the checkpoint does not match the architecture flags:"]
    if missing:
        lines.append(f"  {len(missing)} missing key(s): {_sample(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected key(s): {_sample(unexpected)}")
    if "label_emb.weight" in unexpected:
        lines.append("  the checkpoint is class-conditional: pass --class_cond True")
    elif "label_emb.weight" in missing:
        lines.append("  the checkpoint is unconditional: pass --class_cond False")
    lines.append("  check --num_res_blocks, --channel_mult, --attention_resolutions, --image_size, --resblock_updown")
    raise ConversionError("\n".join(lines))


def _check_shapes(state_dict: Mapping[str, torch.Tensor], leaves: Sequence[_Leaf],
                  shapes: Mapping[str, torch.Size]) -> None:
    wrong = []
    for leaf in leaves:
        want, got = _expected_shape(leaf, shapes), tuple(state_dict[leaf.adm].shape)
        if want != got:
            wrong.append(f"{leaf.adm}: checkpoint {list(got)}, flags give {list(want)}")
    if wrong:
        more = f"\n  ... (+{len(wrong) - 8} more)" if len(wrong) > 8 else ""
        raise ConversionError(
            f"the checkpoint's tensor shapes do not match the architecture flags ({len(wrong)} mismatch(es); check "
            f"--num_channels, --channel_mult, --learn_sigma, --in_channels, --num_classes):\n  "
            + "\n  ".join(wrong[:8]) + more
        )


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    adm_config: Mapping[str, Any],
    dtype: torch.dtype | None = None,
    shapes: Mapping[str, torch.Size] | None = None,
) -> dict[str, torch.Tensor]:
    """ADM tensors -> UNet2DModel tensors (renamed; qkv split; 1-D conv weights squeezed); keys are checked.

    Tensors are reused, not copied, unless a cast to ``dtype`` or the qkv split needs a copy. ``shapes`` (the
    target model's ``state_dict`` shapes) turns on a shape check that names the offending ADM keys.
    """
    cfg = normalize_adm_config(adm_config)
    leaves = _leaves(cfg)
    _check_keys(state_dict, leaves)
    if shapes is not None:
        _check_shapes(state_dict, leaves, shapes)
    out: dict[str, torch.Tensor] = {}
    for leaf in leaves:
        tensor = state_dict[leaf.adm]
        if leaf.op == "qkv":
            pieces = _split_qkv(tensor, leaf.heads, leaf.new_order)
        elif leaf.op == "squeeze":
            pieces = (tensor.reshape(tensor.shape[:-1]),)
        else:
            pieces = (tensor,)
        for name, piece in zip(leaf.diffusers, pieces):
            out[name] = piece if dtype is None else piece.to(dtype)
    return out


def convert_adm(
    state_dict: Mapping[str, torch.Tensor], adm_config: Mapping[str, Any], dtype: torch.dtype | None = None
) -> UNet2DModel:
    """A UNet2DModel (eval mode) computing what ADM's ``UNetModel(**adm_config)`` with ``state_dict`` computes.

    The model is built on the meta device and takes the converted tensors by assignment, so no second copy
    of the weights is made; ``dtype`` None keeps the checkpoint's dtype.
    """
    config = diffusers_unet_config(adm_config)
    with torch.device("meta"):
        unet = UNet2DModel(**config)
    shapes = {name: tensor.shape for name, tensor in unet.state_dict().items()}
    tensors = convert_state_dict(state_dict, adm_config, dtype, shapes)
    extra, absent = set(tensors) - set(shapes), set(shapes) - set(tensors)
    if extra or absent:  # a converter bug, not a user error
        raise RuntimeError(f"internal key map error: extra {_sample(extra)}; absent {_sample(absent)}")
    unet.load_state_dict(tensors, strict=True, assign=True)
    leftover = [name for name, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left on the meta device after conversion: {_sample(leftover)}")
    return unet.eval()


# ------------------------------------------------------------------------------------ files and CLI


def load_adm_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load an ADM checkpoint memory-mapped (plain state dict, or wrapped as {"state_dict"|"model": ...})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:  # legacy (non-zip) files cannot be memory-mapped
        if "mmap" not in str(error):
            raise
        obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{path} holds no state dict (got {type(obj).__name__})")
    non_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if non_tensors:
        raise ConversionError(f"{path}: entries that are not tensors: {_sample(map(str, non_tensors))}")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def adm_scheduler(num_steps: int = 1000, noise_schedule: str = "linear", learn_sigma: bool = False) -> DDPMScheduler:
    """guided-diffusion's beta schedule: "linear" (1e-4..0.02 scaled by 1000/num_steps) or "cosine"."""
    if noise_schedule == "linear":
        scale = 1000 / num_steps
        schedule = {"beta_schedule": "linear", "beta_start": scale * 1e-4, "beta_end": scale * 0.02}
    elif noise_schedule == "cosine":
        schedule = {"beta_schedule": "squaredcos_cap_v2"}
    else:
        raise ConversionError(f"--noise_schedule {noise_schedule!r}: expected linear or cosine")
    return DDPMScheduler(num_train_timesteps=num_steps, prediction_type="epsilon", clip_sample=False,
                         variance_type="learned_range" if learn_sigma else "fixed_large", **schedule)


def save_converted(unet: UNet2DModel, scheduler: DDPMScheduler, adm_config: Mapping[str, Any],
                   out_dir: str | Path) -> Path:
    """Write the pipeline folder (unet/, scheduler/, model_index.json) plus diffguard.json and adm_config.json."""
    out_dir = Path(out_dir)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(out_dir), safe_serialization=True)
    cfg = normalize_adm_config(adm_config)
    meta = {"num_classes": cfg["num_classes"], "null_class": None}  # ADM has no null-class embedding row
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    (out_dir / ADM_CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return out_dir


def convert_adm_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    adm_config: Mapping[str, Any],
    dtype: torch.dtype = torch.float32,
    num_steps: int = 1000,
    noise_schedule: str = "linear",
) -> Path:
    """Checkpoint file -> diffusers pipeline folder ``out_dir``; returns ``out_dir``."""
    cfg = normalize_adm_config(adm_config)
    scheduler = adm_scheduler(num_steps, noise_schedule, learn_sigma=cfg["out_channels"] == 2 * cfg["in_channels"])
    unet = convert_adm(load_adm_state_dict(checkpoint), cfg, dtype)
    return save_converted(unet, scheduler, cfg, out_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffguard_pl.models.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="format", required=True)
    adm = sub.add_parser("adm", help="an OpenAI guided-diffusion UNetModel checkpoint")
    adm.add_argument("checkpoint", type=Path)
    adm.add_argument("out_dir", type=Path)
    notes = {"in_channels": "image channels (guided-diffusion: 3)",
             "num_classes": "classes of a --class_cond True model (guided-diffusion: 1000)",
             "attention_resolutions": "comma list of pixel resolutions, e.g. 32,16,8",
             "channel_mult": 'comma list; "" = guided-diffusion\'s default for --image_size',
             "use_fp16": "accepted for MODEL_FLAGS compatibility; the output dtype is --dtype"}
    for name, default in FLAG_DEFAULTS.items():
        kind = _str2bool if isinstance(default, bool) else str if isinstance(default, str) else type(default)
        adm.add_argument(f"--{name}", type=kind, default=default, help=notes.get(name, f"default {default!r}"))
    adm.add_argument("--diffusion_steps", type=int, default=1000, help="training steps of the beta schedule")
    adm.add_argument("--noise_schedule", choices=("linear", "cosine"), default="linear")
    adm.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {name: getattr(args, name) for name in FLAG_DEFAULTS}
    try:
        cfg = adm_config_from_flags(flags)
        out = convert_adm_checkpoint(args.checkpoint, args.out_dir, cfg, DTYPES[args.dtype], args.diffusion_steps,
                                     args.noise_schedule)
    except (ConversionError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} (diffusers UNet2DModel, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
