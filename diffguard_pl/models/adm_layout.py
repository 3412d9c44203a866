"""The ADM (guided-diffusion ``UNetModel``) architecture as diffusers' ``UNet2DModel``: its flags and config,
and which ADM tensor becomes which diffusers tensor (:mod:`diffguard_pl.models.convert` copies them).

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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
