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

How ADM maps onto UNet2DModel (level = one entry of ``channel_mult``; ADM ``ds`` = 2**level):

- ``time_embed.{0,2}`` -> ``time_embedding.linear_{1,2}``; the sinusoidal features match diffusers'
  ``Timesteps(model_channels, flip_sin_to_cos=True, freq_shift=0)`` (cos half first); ``label_emb`` ->
  ``class_embedding`` (exactly ``num_classes`` rows).
- ``input_blocks.0.0`` -> ``conv_in``. Each level's ``num_res_blocks`` ResBlocks (each followed by an
  AttentionBlock when ``ds`` is in ``attention_resolutions``) -> ``down_blocks.L.resnets.j`` /
  ``.attentions.j``; the level's downsampler -> ``down_blocks.L.downsamplers.0`` (a ResBlock(down=True)
  when ``resblock_updown``, else a stride-2 conv ``op`` -> ``conv``).
- ``middle_block.{0,1,2}`` -> ``mid_block.resnets.0``, ``mid_block.attentions.0``, ``mid_block.resnets.1``.
- ``output_blocks``: per level (deepest first) ``num_res_blocks + 1`` ResBlocks that take the skip tensors in
  the same order as diffusers -> ``up_blocks.U.resnets.i`` / ``.attentions.i``; the upsampler after the
  level's last block -> ``up_blocks.U.upsamplers.0``. ``out.{0,2}`` -> ``conv_norm_out``, ``conv_out``.
- ResBlock: ``in_layers.0/2`` -> ``norm1``/``conv1``, ``emb_layers.1`` -> ``time_emb_proj``,
  ``out_layers.0/3`` -> ``norm2``/``conv2``, ``skip_connection`` (1x1 conv) -> ``conv_shortcut``;
  ``use_scale_shift_norm`` <-> ``resnet_time_scale_shift="scale_shift"`` (first half scale, second shift).
- AttentionBlock: ``norm`` -> ``group_norm``; ``proj_out`` (1-D conv, [C, C, 1]) -> ``to_out.0``; the
  ``qkv`` conv is split into ``to_q``/``to_k``/``to_v``. In the legacy layout (QKVAttentionLegacy, all
  released checkpoints) its 3C output channels are grouped per head as [q_h, k_h, v_h]; with
  ``use_new_attention_order`` they are [q, k, v] with heads inside each. ADM scales q and k by
  ch**-1/4 each, i.e. the standard 1/sqrt(head_dim) of diffusers' attention.
- GroupNorm: 32 groups, eps 1e-5 everywhere (the mid-block attention included, via ``attn_norm_num_groups``).

Refused (ConversionError naming the setting), because UNet2DModel cannot express them exactly:
``channel_mult[0] != 1`` (e.g. the 512x512 model's 0.5: ADM's timestep features are ``model_channels``
wide but the first level is narrower), attention head widths that differ between layers (a fixed
``num_heads`` with growing channels, or ``num_heads_upsample != num_heads``; UNet2DModel has one
``attention_head_dim``), ``conv_resample=False`` without ``resblock_updown``, ``dims != 2`` and widths
that are not multiples of 32. Numerics: ADM runs GroupNorm and the attention softmax in float32 even in
fp16; the converted model in float16 does not, so fp16 outputs differ at fp16 rounding level.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffguard_pl.models.diffusion import META_FILE

ADM_CONFIG_FILE = "adm_config.json"
NUM_CLASSES = 1000  # guided-diffusion's class count for --class_cond True
GROUPS = 32
NORM_EPS = 1e-5

ADM_REQUIRED = ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks",
                "attention_resolutions")
ADM_DEFAULTS: dict[str, Any] = {
    "dropout": 0.0,
    "channel_mult": (1, 2, 4, 8),
    "conv_resample": True,
    "dims": 2,
    "num_classes": None,
    "use_checkpoint": False,
    "use_fp16": False,
    "num_heads": 1,
    "num_head_channels": -1,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "use_new_attention_order": False,
}
DEFAULT_CHANNEL_MULT: dict[int, tuple[float, ...]] = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
}
FLAG_DEFAULTS: dict[str, Any] = {  # guided-diffusion's model_and_diffusion_defaults (+ in_channels, num_classes)
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
    "learn_sigma": False,
    "in_channels": 3,
    "num_classes": NUM_CLASSES,
}
DTYPES = {"float32": torch.float32, "float16": torch.float16}

_RESBLOCK = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
             ("out_layers.0", "norm2"), ("out_layers.3", "conv2"))
_SKIP = ("skip_connection", "conv_shortcut")


class ConversionError(ValueError):
    """The checkpoint or its flags cannot be converted (mismatched keys/shapes or an inexpressible option)."""


@dataclass(frozen=True)
class _Part:
    """One ADM module and the diffusers module it becomes."""

    adm: str
    diffusers: str
    kind: str  # "plain", "embedding", "resblock", "attention", "conv_resample"
    skip: bool = False  # resblock with a 1x1 skip conv
    channels: int = 0  # attention width
    heads: int = 1  # attention heads


@dataclass(frozen=True)
class _Leaf:
    """One ADM tensor, the diffusers tensor(s) it becomes and how ("copy", "squeeze" or "qkv")."""

    adm: str
    diffusers: tuple[str, ...]
    op: str = "copy"
    heads: int = 1
    new_order: bool = False


# ----------------------------------------------------------------------------------------- configs


def normalize_adm_config(adm_config: Mapping[str, Any]) -> dict[str, Any]:
    """UNetModel keyword arguments with ADM's defaults filled in; unknown or missing keys raise."""
    known = set(ADM_REQUIRED) | set(ADM_DEFAULTS)
    unknown = sorted(set(adm_config) - known)
    if unknown:
        raise ConversionError(f"unknown UNetModel argument(s) {unknown}; known: {sorted(known)}")
    missing = [k for k in ADM_REQUIRED if k not in adm_config]
    if missing:
        raise ConversionError(f"missing UNetModel argument(s) {missing}")
    cfg = {**ADM_DEFAULTS, **dict(adm_config)}
    cfg["attention_resolutions"] = tuple(int(ds) for ds in cfg["attention_resolutions"])
    cfg["channel_mult"] = tuple(cfg["channel_mult"])
    return cfg


def _str2bool(value: Any) -> bool:
    """guided-diffusion's str2bool."""
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("yes", "true", "t", "y", "1"):
        return True
    if text in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


def _int_list(value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(",") if v.strip())
    return tuple(int(v) for v in value)


def adm_config_from_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """guided-diffusion script flags (``--num_channels``, pixel ``--attention_resolutions``, ...) -> UNetModel kwargs.

    Missing flags take guided-diffusion's ``model_and_diffusion_defaults``; ``channel_mult=""`` picks the
    default for the image size, and ``attention_resolutions`` become ds factors ``image_size // res``.
    """
    f = {**FLAG_DEFAULTS, **{k: v for k, v in flags.items() if v is not None}}
    image_size = int(f["image_size"])
    mult = f["channel_mult"]
    if isinstance(mult, str) and not mult.strip():
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ConversionError(f"no default --channel_mult for --image_size {image_size}; pass --channel_mult")
        mult = DEFAULT_CHANNEL_MULT[image_size]
    else:
        mult = _int_list(mult)
    resolutions = _int_list(f["attention_resolutions"])
    bad = [r for r in resolutions if r <= 0 or image_size % r]
    if bad:
        raise ConversionError(f"--attention_resolutions {bad} do not divide --image_size {image_size}")
    in_channels = int(f["in_channels"])
    return {
        "image_size": image_size,
        "in_channels": in_channels,
        "model_channels": int(f["num_channels"]),
        "out_channels": 2 * in_channels if _str2bool(f["learn_sigma"]) else in_channels,
        "num_res_blocks": int(f["num_res_blocks"]),
        "attention_resolutions": tuple(image_size // r for r in resolutions),
        "dropout": float(f["dropout"]),
        "channel_mult": tuple(mult),
        "num_classes": int(f["num_classes"]) if _str2bool(f["class_cond"]) else None,
        "use_checkpoint": _str2bool(f["use_checkpoint"]),
        "use_fp16": _str2bool(f["use_fp16"]),
        "num_heads": int(f["num_heads"]),
        "num_head_channels": int(f["num_head_channels"]),
        "num_heads_upsample": int(f["num_heads_upsample"]),
        "use_scale_shift_norm": _str2bool(f["use_scale_shift_norm"]),
        "resblock_updown": _str2bool(f["resblock_updown"]),
        "use_new_attention_order": _str2bool(f["use_new_attention_order"]),
    }


def _widths(cfg: Mapping[str, Any]) -> list[int]:
    return [int(mult * cfg["model_channels"]) for mult in cfg["channel_mult"]]


def _attention_levels(cfg: Mapping[str, Any]) -> list[bool]:
    return [2**level in cfg["attention_resolutions"] for level in range(len(cfg["channel_mult"]))]


def _heads(cfg: Mapping[str, Any], channels: int, up: bool) -> int:
    """ADM's head count of an AttentionBlock of width ``channels`` (``up``: in output_blocks)."""
    if cfg["num_head_channels"] != -1:
        if channels % cfg["num_head_channels"]:
            raise ConversionError(f"attention width {channels} is not divisible by --num_head_channels "
                                  f"{cfg['num_head_channels']}")
        return channels // cfg["num_head_channels"]
    heads = cfg["num_heads_upsample"] if up and cfg["num_heads_upsample"] != -1 else cfg["num_heads"]
    if heads < 1 or channels % heads:
        raise ConversionError(f"attention width {channels} is not divisible by {heads} heads (--num_heads / "
                              f"--num_heads_upsample)")
    return heads


def _layout(cfg: Mapping[str, Any]) -> list[_Part]:
    """Every parameterised ADM module of ``cfg`` paired with its UNet2DModel module."""
    widths, attention, blocks = _widths(cfg), _attention_levels(cfg), cfg["num_res_blocks"]
    updown, last = cfg["resblock_updown"], len(widths) - 1
    parts = [_Part("time_embed.0", "time_embedding.linear_1", "plain"),
             _Part("time_embed.2", "time_embedding.linear_2", "plain")]
    if cfg["num_classes"] is not None:
        parts.append(_Part("label_emb", "class_embedding", "embedding"))
    parts.append(_Part("input_blocks.0.0", "conv_in", "plain"))

    def attn(adm: str, dif: str, ch: int, up: bool) -> _Part:
        return _Part(adm, dif, "attention", channels=ch, heads=_heads(cfg, ch, up))

    ch, index, skips = widths[0], 1, [widths[0]]
    for level, width in enumerate(widths):
        for j in range(blocks):
            parts.append(_Part(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", "resblock",
                               skip=ch != width))
            ch = width
            if attention[level]:
                parts.append(attn(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", ch, False))
            skips.append(ch)
            index += 1
        if level != last:
            parts.append(_Part(f"input_blocks.{index}.0", f"down_blocks.{level}.downsamplers.0",
                               "resblock" if updown else "conv_resample"))
            skips.append(ch)
            index += 1
    parts += [_Part("middle_block.0", "mid_block.resnets.0", "resblock"),
              attn("middle_block.1", "mid_block.attentions.0", ch, False),
              _Part("middle_block.2", "mid_block.resnets.1", "resblock")]
    index = 0
    for up, level in enumerate(reversed(range(len(widths)))):
        width = widths[level]
        for i in range(blocks + 1):
            inputs = ch + skips.pop()
            parts.append(_Part(f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{i}", "resblock",
                               skip=inputs != width))
            ch, sub = width, 1
            if attention[level]:
                parts.append(attn(f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{i}", ch, True))
                sub = 2
            if level and i == blocks:
                parts.append(_Part(f"output_blocks.{index}.{sub}", f"up_blocks.{up}.upsamplers.0",
                                   "resblock" if updown else "conv_resample"))
            index += 1
    parts += [_Part("out.0", "conv_norm_out", "plain"), _Part("out.2", "conv_out", "plain")]
    return parts


def _leaves(cfg: Mapping[str, Any]) -> list[_Leaf]:
    """Every ADM tensor of ``cfg`` with its diffusers name(s)."""
    leaves: list[_Leaf] = []
    for part in _layout(cfg):
        a, d = part.adm, part.diffusers
        if part.kind == "embedding":
            leaves.append(_Leaf(f"{a}.weight", (f"{d}.weight",)))
            continue
        if part.kind == "plain":
            pairs = [("", "")]
        elif part.kind == "conv_resample":  # ADM Downsample names its conv "op", Upsample "conv"
            pairs = [("op." if ".downsamplers." in d else "conv.", "conv.")]
        elif part.kind == "resblock":
            pairs = [(f"{x}.", f"{y}.") for x, y in _RESBLOCK + ((_SKIP,) if part.skip else ())]
        else:
            for p in ("weight", "bias"):
                leaves += [
                    _Leaf(f"{a}.norm.{p}", (f"{d}.group_norm.{p}",)),
                    _Leaf(f"{a}.qkv.{p}", tuple(f"{d}.to_{n}.{p}" for n in "qkv"), "qkv", part.heads,
                          bool(cfg["use_new_attention_order"])),
                    _Leaf(f"{a}.proj_out.{p}", (f"{d}.to_out.0.{p}",), "squeeze" if p == "weight" else "copy"),
                ]
            continue
        for x, y in pairs:
            leaves += [_Leaf(f"{a}.{x}{p}", (f"{d}.{y}{p}",)) for p in ("weight", "bias")]
    return leaves


def diffusers_unet_config(adm_config: Mapping[str, Any]) -> dict[str, Any]:
    """UNet2DModel keyword arguments equivalent to ADM's UNetModel ``adm_config``; raises if inexpressible."""
    cfg = normalize_adm_config(adm_config)
    if cfg["dims"] != 2:
        raise ConversionError(f"dims={cfg['dims']}: only 2-D ADM models can be converted to UNet2DModel")
    if not cfg["conv_resample"] and not cfg["resblock_updown"]:
        raise ConversionError("conv_resample=False (parameter-free up/downsampling) has no UNet2DModel equivalent "
                              "unless --resblock_updown True")
    if cfg["num_res_blocks"] < 1:
        raise ConversionError(f"--num_res_blocks {cfg['num_res_blocks']}: at least 1 is needed")
    widths = _widths(cfg)
    if widths[0] != cfg["model_channels"]:
        raise ConversionError(
            f"--channel_mult {cfg['channel_mult']}: the first multiplier must be 1. ADM's timestep features are "
            f"model_channels={cfg['model_channels']} wide but its first level is {widths[0]}; UNet2DModel ties both "
            f"to block_out_channels[0] (this rules out guided-diffusion's 512x512 model)"
        )
    bad = [w for w in widths if w % GROUPS]
    if bad:
        raise ConversionError(f"--num_channels/--channel_mult give widths {widths}; GroupNorm({GROUPS}) needs "
                              f"multiples of {GROUPS}")
    head_dims = sorted({p.channels // p.heads for p in _layout(cfg) if p.kind == "attention"})
    if len(head_dims) != 1:
        raise ConversionError(
            f"the attention layers have different head widths {head_dims} (from --num_heads {cfg['num_heads']}, "
            f"--num_heads_upsample {cfg['num_heads_upsample']}, --num_head_channels {cfg['num_head_channels']}); "
            f"UNet2DModel has a single attention_head_dim"
        )
    attention = _attention_levels(cfg)
    updown = cfg["resblock_updown"]
    plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if updown else ("DownBlock2D",
                                                                                                   "UpBlock2D")
    return {
        "sample_size": int(cfg["image_size"]),
        "in_channels": int(cfg["in_channels"]),
        "out_channels": int(cfg["out_channels"]),
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": tuple("AttnDownBlock2D" if a else plain_down for a in attention),
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": tuple("AttnUpBlock2D" if a else plain_up for a in reversed(attention)),
        "block_out_channels": tuple(widths),
        "layers_per_block": int(cfg["num_res_blocks"]),
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv",
        "dropout": float(cfg["dropout"]),
        "act_fn": "silu",
        "attention_head_dim": head_dims[0],
        "norm_num_groups": GROUPS,
        "attn_norm_num_groups": GROUPS,
        "norm_eps": NORM_EPS,
        "resnet_time_scale_shift": "scale_shift" if cfg["use_scale_shift_norm"] else "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": cfg["num_classes"],
    }


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
