"""guided-diffusion (ADM) -> diffusers UNet2DModel conversion.

Golden outputs of the real guided-diffusion UNetModel live in ../shared/fixtures/adm (see its README);
configurations they do not cover are checked against ``adm_forward`` below, a small functional
re-implementation of ADM's UNetModel on ADM-named tensors that is itself checked against the fixtures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from safetensors import safe_open

from diffguard_pl.models.convert import (
    ConversionError,
    adm_config_from_flags,
    adm_scheduler,
    convert_adm,
    load_adm_state_dict,
    main,
    normalize_adm_config,
    save_converted,
)
from diffguard_pl.models.diffusion import load_diffusion

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "adm"
TOL64, TOL32 = 1e-5, 1e-4  # relative errors (max |diff| / max |ref|) from the fixtures' README
FLAGS = {  # guided-diffusion script flags equivalent to each fixture's UNetModel config
    "cond": ["--image_size", "16", "--num_channels", "32", "--num_res_blocks", "1", "--attention_resolutions", "8,4",
             "--channel_mult", "1,1,1,1", "--class_cond", "True", "--num_classes", "10", "--learn_sigma", "True",
             "--num_heads", "4", "--num_head_channels", "8", "--use_scale_shift_norm", "True",
             "--resblock_updown", "True", "--use_fp16", "False", "--dropout", "0.0"],
    "uncond": ["--image_size", "16", "--num_channels", "32", "--num_res_blocks", "2", "--attention_resolutions", "8",
               "--channel_mult", "1,1,1", "--class_cond", "False", "--learn_sigma", "False", "--num_heads", "4",
               "--num_head_channels", "16", "--use_scale_shift_norm", "True", "--resblock_updown", "True"],
}


def load_fixture(name: str) -> dict[str, Any]:
    path = FIXTURES / f"adm_tiny_{name}.pt"
    if not path.is_file():
        pytest.skip(f"ADM golden fixture {path} is absent (expected ../shared beside the checkout)")
    data = torch.load(path, map_location="cpu", weights_only=True)
    data["config"] = {k: v for k, v in data["config"].items() if k != "guided_diffusion_commit"}
    return data


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@torch.no_grad()
def run_unet(unet: UNet2DModel, data: dict[str, Any], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    unet = unet.to(dtype)
    return unet(data["x"].to(dtype), data["t"], class_labels=data["y"]).sample


# ---------------------------------------------------------------- an independent functional ADM reference


def adm_structure(cfg: dict[str, Any]) -> tuple[list, list, list]:
    """ADM's input, middle and output blocks as lists of layer specs, following UNetModel.__init__."""
    mc, updown = cfg["model_channels"], cfg["resblock_updown"]

    def heads(ch: int, up: bool) -> int:
        if cfg["num_head_channels"] != -1:
            return ch // cfg["num_head_channels"]
        return cfg["num_heads_upsample"] if up and cfg["num_heads_upsample"] != -1 else cfg["num_heads"]

    ch = int(cfg["channel_mult"][0] * mc)
    inputs, chans, ds = [[("conv_in", cfg["in_channels"], ch)]], [ch], 1
    for level, mult in enumerate(cfg["channel_mult"]):
        for _ in range(cfg["num_res_blocks"]):
            layers = [("res", ch, int(mult * mc), "")]
            ch = int(mult * mc)
            if ds in cfg["attention_resolutions"]:
                layers.append(("attn", ch, heads(ch, False)))
            inputs.append(layers)
            chans.append(ch)
        if level != len(cfg["channel_mult"]) - 1:
            inputs.append([("res", ch, ch, "down") if updown else ("down", ch)])
            chans.append(ch)
            ds *= 2
    middle = [("res", ch, ch, ""), ("attn", ch, heads(ch, False)), ("res", ch, ch, "")]
    outputs = []
    for level, mult in list(enumerate(cfg["channel_mult"]))[::-1]:
        for i in range(cfg["num_res_blocks"] + 1):
            layers = [("res", ch + chans.pop(), int(mc * mult), "")]
            ch = int(mc * mult)
            if ds in cfg["attention_resolutions"]:
                layers.append(("attn", ch, heads(ch, True)))
            if level and i == cfg["num_res_blocks"]:
                layers.append(("res", ch, ch, "up") if updown else ("up", ch))
                ds //= 2
            outputs.append(layers)
    return inputs, middle, outputs


def adm_random_state_dict(cfg: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Random ADM-named parameters for ``cfg`` (float64; norms near 1, small biases)."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name: str, cin: int, cout: int, *kernel: int) -> None:
        fan_in = cin * math.prod(kernel)
        sd[f"{name}.weight"] = torch.randn(cout, cin, *kernel, generator=gen, dtype=torch.float64) / fan_in**0.5
        sd[f"{name}.bias"] = 0.1 * torch.randn(cout, generator=gen, dtype=torch.float64)

    def norm(name: str, ch: int) -> None:
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(ch, generator=gen, dtype=torch.float64)
        sd[f"{name}.bias"] = 0.1 * torch.randn(ch, generator=gen, dtype=torch.float64)

    mc, emb = cfg["model_channels"], 4 * cfg["model_channels"]
    conv("time_embed.0", mc, emb)
    conv("time_embed.2", emb, emb)
    if cfg["num_classes"] is not None:
        sd["label_emb.weight"] = torch.randn(cfg["num_classes"], emb, generator=gen, dtype=torch.float64)

    def layer(prefix: str, spec: tuple) -> None:
        if spec[0] == "conv_in":
            conv(prefix, spec[1], spec[2], 3, 3)
        elif spec[0] == "res":
            cin, cout = spec[1], spec[2]
            norm(f"{prefix}.in_layers.0", cin)
            conv(f"{prefix}.in_layers.2", cin, cout, 3, 3)
            conv(f"{prefix}.emb_layers.1", emb, 2 * cout if cfg["use_scale_shift_norm"] else cout)
            norm(f"{prefix}.out_layers.0", cout)
            conv(f"{prefix}.out_layers.3", cout, cout, 3, 3)
            if cin != cout:
                conv(f"{prefix}.skip_connection", cin, cout, 1, 1)
        elif spec[0] == "attn":
            norm(f"{prefix}.norm", spec[1])
            conv(f"{prefix}.qkv", spec[1], 3 * spec[1], 1)
            conv(f"{prefix}.proj_out", spec[1], spec[1], 1)
        elif spec[0] == "down":
            conv(f"{prefix}.op", spec[1], spec[1], 3, 3)
        else:
            conv(f"{prefix}.conv", spec[1], spec[1], 3, 3)

    inputs, middle, outputs = adm_structure(cfg)
    for name, blocks in (("input_blocks", inputs), ("output_blocks", outputs)):
        for i, block in enumerate(blocks):
            for j, spec in enumerate(block):
                layer(f"{name}.{i}.{j}", spec)
    for j, spec in enumerate(middle):
        layer(f"middle_block.{j}", spec)
    norm("out.0", mc)
    conv("out.2", mc, cfg["out_channels"], 3, 3)
    return sd


def adm_forward(sd: dict[str, torch.Tensor], cfg: dict[str, Any], x: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor | None) -> torch.Tensor:
    """ADM's UNetModel.forward written functionally on ADM-named tensors."""

    def gn(h: torch.Tensor, p: str) -> torch.Tensor:
        return F.group_norm(h, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)

    def res(h: torch.Tensor, emb: torch.Tensor, p: str, mode: str) -> torch.Tensor:
        skip, h = h, F.silu(gn(h, f"{p}.in_layers.0"))
        if mode:
            resample = (lambda z: F.interpolate(z, scale_factor=2, mode="nearest")) if mode == "up" else (
                lambda z: F.avg_pool2d(z, 2, 2))
            h, skip = resample(h), resample(skip)
        h = F.conv2d(h, sd[f"{p}.in_layers.2.weight"], sd[f"{p}.in_layers.2.bias"], padding=1)
        e = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[:, :, None, None]
        if cfg["use_scale_shift_norm"]:
            scale, shift = e.chunk(2, dim=1)
            h = gn(h, f"{p}.out_layers.0") * (1 + scale) + shift
        else:
            h = gn(h + e, f"{p}.out_layers.0")
        h = F.conv2d(F.silu(h), sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"], padding=1)
        if f"{p}.skip_connection.weight" in sd:
            skip = F.conv2d(skip, sd[f"{p}.skip_connection.weight"], sd[f"{p}.skip_connection.bias"])
        return skip + h

    def attn(h: torch.Tensor, p: str, heads: int) -> torch.Tensor:
        b, c, *spatial = h.shape
        flat = h.reshape(b, c, -1)
        qkv = F.conv1d(gn(flat, f"{p}.norm"), sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"])
        ch, length = c // heads, flat.shape[-1]
        if cfg["use_new_attention_order"]:
            q, k, v = (z.reshape(b * heads, ch, length) for z in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, length)
        return (flat + F.conv1d(a, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])).reshape(b, c, *spatial)

    def apply(h: torch.Tensor, emb: torch.Tensor, p: str, spec: tuple) -> torch.Tensor:
        if spec[0] == "conv_in":
            return F.conv2d(h, sd[f"{p}.weight"], sd[f"{p}.bias"], padding=1)
        if spec[0] == "res":
            return res(h, emb, p, spec[3])
        if spec[0] == "attn":
            return attn(h, p, spec[2])
        if spec[0] == "down":
            return F.conv2d(h, sd[f"{p}.op.weight"], sd[f"{p}.op.bias"], stride=2, padding=1)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        return F.conv2d(h, sd[f"{p}.conv.weight"], sd[f"{p}.conv.bias"], padding=1)

    half = cfg["model_channels"] // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(x.dtype)
    emb = F.linear(F.silu(F.linear(features, sd["time_embed.0.weight"], sd["time_embed.0.bias"])),
                   sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    if y is not None:
        emb = emb + sd["label_emb.weight"][y]
    inputs, middle, outputs = adm_structure(cfg)
    h, hs = x, []
    for i, block in enumerate(inputs):
        for j, spec in enumerate(block):
            h = apply(h, emb, f"input_blocks.{i}.{j}", spec)
        hs.append(h)
    for j, spec in enumerate(middle):
        h = apply(h, emb, f"middle_block.{j}", spec)
    for i, block in enumerate(outputs):
        h = torch.cat([h, hs.pop()], dim=1)
        for j, spec in enumerate(block):
            h = apply(h, emb, f"output_blocks.{i}.{j}", spec)
    h = F.silu(gn(h, "out.0"))
    return F.conv2d(h, sd["out.2.weight"], sd["out.2.bias"], padding=1)


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ["cond", "uncond"])
def test_reference_reproduces_fixture(name):
    data = load_fixture(name)
    sd = {k: v.double() for k, v in data["state_dict"].items()}
    out = adm_forward(sd, normalize_adm_config(data["config"]), data["x"].double(), data["t"], data["y"])
    assert rel_error(out, data["out64"]) < 1e-12


@pytest.mark.parametrize("name", ["cond", "uncond"])
def test_fixture_roundtrip_matches_adm(name, tmp_path):
    data = load_fixture(name)
    unet = convert_adm(data["state_dict"], data["config"])
    before = run_unet(unet, data)
    save_converted(unet, adm_scheduler(), data["config"], tmp_path)
    loaded = UNet2DModel.from_pretrained(str(tmp_path / "unet"), low_cpu_mem_usage=False).eval()
    after = run_unet(loaded, data)
    assert torch.equal(before, after), "saving and reloading changed the outputs"
    err32 = rel_error(after, data["out"])
    err64 = rel_error(run_unet(loaded, data, torch.float64), data["out64"])
    print(f"{name}: float32 rel error {err32:.2e}, float64 rel error {err64:.2e}")
    assert err32 < TOL32 and err64 < TOL64


def test_legacy_qkv_layout_matters():
    data = load_fixture("cond")
    wrong = convert_adm(data["state_dict"], {**data["config"], "use_new_attention_order": True})
    assert rel_error(run_unet(wrong, data), data["out"]) > 0.1


@pytest.mark.parametrize("name", ["cond", "uncond"])
def test_flags_give_fixture_config(name):
    args = FLAGS[name]
    flags = dict(zip([a[2:] for a in args[::2]], args[1::2]))
    assert normalize_adm_config(adm_config_from_flags(flags)) == normalize_adm_config(load_fixture(name)["config"])


@pytest.mark.parametrize("name", ["cond", "uncond"])
def test_cli_output_loads_in_diffguard(name, tmp_path, capsys):
    data = load_fixture(name)
    checkpoint, out = tmp_path / "model.pt", tmp_path / "converted"
    torch.save({"state_dict": data["state_dict"]} if name == "cond" else data["state_dict"], checkpoint)
    assert main(["adm", str(checkpoint), str(out), *FLAGS[name]]) == 0, capsys.readouterr().err
    assert json.loads((out / "diffguard.json").read_text()) == {
        "num_classes": data["config"]["num_classes"], "null_class": None}
    assert (out / "model_index.json").is_file() and (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    model = load_diffusion(out)
    assert model.num_classes == data["config"]["num_classes"] and model.null_class is None
    reference = data["out"][:, :3]
    with torch.no_grad():
        eps = model.eps(data["x"], data["t"], data["y"])
    assert eps.shape == reference.shape and rel_error(eps, reference) < TOL32
    betas = DDPMScheduler.from_pretrained(str(out / "scheduler")).betas.double()
    assert betas.shape == (1000,) and torch.allclose(betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


def test_cli_float16(tmp_path):
    data = load_fixture("uncond")
    checkpoint = tmp_path / "model.pt"
    torch.save({"model": data["state_dict"]}, checkpoint)
    assert main(["adm", str(checkpoint), str(tmp_path / "out"), *FLAGS["uncond"], "--dtype", "float16"]) == 0
    with safe_open(str(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict) == {torch.float16}


def test_wrong_num_res_blocks_names_keys(tmp_path, capsys):
    data = load_fixture("cond")
    checkpoint = tmp_path / "model.pt"
    torch.save(data["state_dict"], checkpoint)
    flags = list(FLAGS["cond"])
    flags[flags.index("--num_res_blocks") + 1] = "2"
    assert main(["adm", str(checkpoint), str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert "missing key(s)" in err and "unexpected key(s)" in err and "--num_res_blocks" in err
    assert not (tmp_path / "out").exists()


def test_wrong_width_and_conditioning_are_named():
    data = load_fixture("cond")
    with pytest.raises(ConversionError, match=r"shapes do not match.*\n.*time_embed\.0\.weight"):
        convert_adm(data["state_dict"], {**data["config"], "model_channels": 64})
    with pytest.raises(ConversionError, match="--class_cond True"):
        convert_adm(data["state_dict"], {**data["config"], "num_classes": None})
    with pytest.raises(ConversionError, match=r"label_emb\.weight: checkpoint \[10, 128\], flags give \[1000, 128\]"):
        convert_adm(data["state_dict"], {**data["config"], "num_classes": 1000})


UNCOVERED: dict[str, dict[str, Any]] = {  # options the fixtures do not exercise
    "conv_updown_additive_growth_fixed_heads": {
        "image_size": 16, "in_channels": 3, "model_channels": 32, "out_channels": 6, "num_res_blocks": 2,
        "attention_resolutions": (2,), "channel_mult": (1, 2), "num_classes": 5, "num_heads": 2,
        "use_scale_shift_norm": False, "resblock_updown": False},
    "new_attention_order_three_levels": {
        "image_size": 16, "in_channels": 1, "model_channels": 32, "out_channels": 1, "num_res_blocks": 1,
        "attention_resolutions": (1, 2, 4), "channel_mult": (1, 1, 2), "num_heads": 4, "num_head_channels": 16,
        "use_scale_shift_norm": True, "resblock_updown": True, "use_new_attention_order": True},
    "updown_growth_additive": {
        "image_size": 8, "in_channels": 3, "model_channels": 32, "out_channels": 3, "num_res_blocks": 1,
        "attention_resolutions": (), "channel_mult": (1, 2, 3), "num_head_channels": 32,
        "use_scale_shift_norm": False, "resblock_updown": True},
}


@pytest.mark.parametrize("name", sorted(UNCOVERED))
def test_uncovered_options_match_reference(name):
    cfg = normalize_adm_config(UNCOVERED[name])
    sd = adm_random_state_dict(cfg, seed=len(name))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg["in_channels"], cfg["image_size"], cfg["image_size"], generator=gen, dtype=torch.float64)
    t = torch.tensor([3, 871])
    y = None if cfg["num_classes"] is None else torch.tensor([0, cfg["num_classes"] - 1])
    ref = adm_forward(sd, cfg, x, t, y)
    unet = convert_adm(sd, cfg)
    with torch.no_grad():
        out = unet(x, t, class_labels=y).sample
    assert rel_error(out, ref) < 1e-10


@pytest.mark.parametrize("change, match", [
    ({"channel_mult": (0.5, 1, 1)}, "--channel_mult"),
    ({"num_heads_upsample": 2}, "different head widths"),
    ({"num_head_channels": -1, "num_heads": 2, "channel_mult": (1, 2), "attention_resolutions": (1, 2)},
     "different head widths"),
    ({"conv_resample": False, "resblock_updown": False}, "conv_resample"),
    ({"dims": 1}, "dims=1"),
    ({"model_channels": 48}, "multiples of 32"),
    ({"use_kl": True}, "unknown UNetModel argument"),
])
def test_inexpressible_configs_are_refused(change, match):
    cfg = {"image_size": 16, "in_channels": 3, "model_channels": 32, "out_channels": 3, "num_res_blocks": 1,
           "attention_resolutions": (2,), "channel_mult": (1, 1, 1), "num_heads": 4, **change}
    with pytest.raises(ConversionError, match=match):
        convert_adm({}, cfg)


def test_flag_defaults_follow_guided_diffusion():
    cfg = adm_config_from_flags({"image_size": 256, "attention_resolutions": "32,16,8", "class_cond": "True",
                                 "learn_sigma": "true", "num_head_channels": 64})
    assert cfg["channel_mult"] == (1, 1, 2, 2, 4, 4) and cfg["attention_resolutions"] == (8, 16, 32)
    assert cfg["num_classes"] == 1000 and cfg["out_channels"] == 6 and cfg["model_channels"] == 128
    assert adm_config_from_flags({"image_size": 32})["channel_mult"] == (1, 2, 2, 2)
    assert adm_config_from_flags({"image_size": 64})["channel_mult"] == (1, 2, 3, 4)
    with pytest.raises(ConversionError, match="--channel_mult"):
        adm_config_from_flags({"image_size": 48})


def test_state_dict_wrappers(tmp_path):
    sd = {"a.weight": torch.zeros(2), "b.bias": torch.ones(1)}
    for i, obj in enumerate([sd, {"state_dict": sd}, {"model": sd}, {f"module.{k}": v for k, v in sd.items()}]):
        torch.save(obj, tmp_path / f"{i}.pt")
        loaded = load_adm_state_dict(tmp_path / f"{i}.pt")
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    torch.save({"step": 3}, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match="not tensors"):
        load_adm_state_dict(tmp_path / "bad.pt")


def test_converted_conditional_model_without_null_class_runs_diffguard(tmp_path):
    """guided-diffusion's class-conditional ADM has no null class: inversion and reference run under the label."""
    from diffguard_pl.config import CutoutConfig, DiffGuardConfig, GuidanceConfig
    from diffguard_pl.models import ClassifierSpec, build_classifier
    from diffguard_pl.method.pipeline import DiffGuardPipeline

    data = load_fixture("cond")
    torch.save(data["state_dict"], tmp_path / "model.pt")
    assert main(["adm", str(tmp_path / "model.pt"), str(tmp_path / "out"), *FLAGS["cond"]]) == 0
    model = load_diffusion(tmp_path / "out")
    assert model.conditional and model.null_class is None
    torch.manual_seed(0)
    spec = ClassifierSpec("diffguard_resnet_tiny", num_classes=10, in_chans=3, input_size=16, mean=[0.5] * 3,
                          std=[0.5] * 3)
    cfg = DiffGuardConfig(num_steps=6, depth=3, reference="unguided",
                          guidance=GuidanceConfig(scale=1.0, cutout=CutoutConfig(num=2)))
    pipe = DiffGuardPipeline(model, build_classifier(spec).eval(), cfg)
    out = pipe(torch.rand(2, 3, 16, 16), ["a", "b"])
    assert all(torch.isfinite(v).all() for v in out["scores"].values())
    with pytest.raises(ValueError, match="no null class"):
        pipe.invert(torch.rand(2, 3, 16, 16), ["a", "b"])
    with pytest.raises(ValueError, match="classifier_free needs"):
        DiffGuardPipeline(model, build_classifier(spec).eval(),
                          DiffGuardConfig(guidance=GuidanceConfig(mode="classifier_free")))
