"""GPU code paths on the simulated CUDA device (tests/helpers/simulated_cuda.py): placement and host reads, on the CPU.

Every path a GPU user runs (the pipeline's guidance modes, latent models, evaluate.py through Lightning,
train.py's modules, the throughput script) runs here with its models and data on a simulated ``cuda:0``:
a tensor left on the CPU fails as it would on a GPU, the numbers must equal the CPU run's bit for bit, and
the pipeline's reads back to the host must not grow with the number of steps.
"""

import collections
import json

import pytest
import torch

import diffguard_pl.jobs.eval_job as eval_job
import diffguard_pl.jobs.train_job as train_job
import diffguard_pl.jobs.lightning_setup as lightning_setup
from diffguard_pl import config as config_lib
from diffguard_pl.config import EvalConfig, TrainConfig
from diffguard_pl.method.ddim import Ladder
from diffguard_pl.models import DiffusionModel, load_classifier, load_diffusion
from diffguard_pl.method.oracle import Oracle
from diffguard_pl.method.pipeline import DiffGuardPipeline

from benchmarks.perf import throughput
from helpers.paths import CHECKPOINTS, ROOT
from helpers.simulated_cuda import on_cuda, simulated_cuda, simulated_gpu_strategy


def preset(name, *overrides):
    return config_lib.to_object(config_lib.compose(EvalConfig, [ROOT / "conf" / name], list(overrides)))


def pipeline(cfg, diffusion=None):
    return DiffGuardPipeline(diffusion or load_diffusion(cfg.models.diffusion),
                             load_classifier(cfg.models.classifier), cfg.diffguard)


def mixed(benchmark, per_set=2):
    sets = [benchmark.test] + [s.test for s in benchmark.ood.values()]
    return torch.cat([s.images[:per_set] for s in sets]), [i for s in sets for i in s.ids[:per_set]]


# --------------------------------------------------------------------------- the simulator itself


def test_the_simulated_device_applies_the_cuda_rules():
    with simulated_cuda() as sim:
        x = torch.rand(2, 3).to("cuda")
        assert on_cuda(x) and x.device == torch.device("cuda", 0) and x.is_cuda
        for wrong in (lambda: x + torch.ones(3), lambda: torch.cat([x, torch.ones(2, 3)]),
                      lambda: torch.ones(5)[torch.tensor([1]).cuda()], lambda: x.numpy(),
                      lambda: torch.randn(2, generator=torch.Generator(), device="cuda"),
                      lambda: x.__setitem__(torch.tensor([0]), torch.zeros(1, 3))):
            with pytest.raises((RuntimeError, TypeError)):
                wrong()
        # What CUDA allows: CPU scalars, CPU indices into CUDA tensors, copies across devices.
        assert on_cuda(x * torch.tensor(2.0)) and on_cuda(x[torch.tensor([1])])
        assert on_cuda(torch.full((2,), 1, device=x.device)) and on_cuda(torch.empty_like(x))
        assert on_cuda(x.new_zeros(3)) and all(on_cuda(p) for p in x.split(1))
        host = torch.zeros(2, 3)
        assert sim.syncs == 0
        host.copy_(x)
        back = x.cpu()
        assert not on_cuda(host) and not on_cuda(back) and torch.equal(back, host)
        assert sim.syncs == 2  # both copies to the host wait for the device
        bool(x.sum() > 0), x.max().item(), x.tolist(), x[x > 0.5]
        assert sim.syncs == 6
        # Modules and autograd.
        layer = torch.nn.Linear(3, 4).to("cuda")
        assert on_cuda(layer.weight) and isinstance(layer.weight, torch.nn.Parameter)
        (grad,) = torch.autograd.grad(layer(x).sum(), layer.weight)
        assert on_cuda(grad) and torch.allclose(grad.cpu(), torch.ones(4, 1) * x.cpu().sum(0))
        assert not on_cuda(layer.cpu().weight)
    assert not on_cuda(torch.rand(2).to("cpu"))


# --------------------------------------------------------------------------- the pipeline


def run_both(pipe_cpu, pipe_gpu, images, ids, oracle=None):
    """The pipeline on the CPU and on the simulated GPU; the GPU run's outputs, checked to be on the device."""
    cpu = pipe_cpu(images, ids, None if oracle is None else {"ind": Oracle(oracle)})
    with simulated_cuda():
        pipe_gpu.to("cuda")
        gpu = pipe_gpu(images.to("cuda"), ids, None if oracle is None else {"ind": Oracle(oracle.to("cuda"))})
        assert on_cuda(gpu["synthesis"]) and on_cuda(gpu["pred"]) and all(on_cuda(v) for v in gpu["scores"].values())
    pairs = [(cpu["scores"], gpu["scores"])]
    if oracle is not None:
        pairs.append((cpu["oracle_scores"]["ind"], gpu["oracle_scores"]["ind"]))
    for cpu_scores, gpu_scores in pairs:
        for name, value in cpu_scores.items():
            assert torch.equal(value, gpu_scores[name].cpu()), name
    assert torch.equal(cpu["depth"], gpu["depth"]) and torch.equal(cpu["unet_evals"], gpu["unet_evals"])
    return cpu, gpu


@pytest.mark.parametrize("name, overrides", [
    ("digits_gdm.yaml", ["diffguard.reference=unguided", "diffguard.aes.enabled=true", "diffguard.aes.psnr=12",
                         "diffguard.aes.min_depth=1", "diffguard.distances=[l2,ssim,psnr,logit_l1,feature_cos]"]),
    ("digits_gdm.yaml", ["diffguard.runtime.channels_last=true", "diffguard.runtime.inference_mode=false"]),
    ("digits_classifier_free.yaml", ["diffguard.reference=unguided"]),
    pytest.param("digits_gdm.yaml", ["diffguard.runtime.autocast=bf16", "diffguard.runtime.channels_last=true"],
                 marks=pytest.mark.slow),  # bf16 is emulated on CPUs without AVX-512 BF16
    pytest.param("digits_classifier_free.yaml", ["diffguard.runtime.autocast=bf16"], marks=pytest.mark.slow),
], ids=["gdm_aes_reference", "gdm_channels_last", "classifier_free_dsg", "gdm_bf16", "classifier_free_dsg_bf16"])
def test_pipeline_on_the_simulated_gpu_equals_the_cpu(benchmark, name, overrides):
    cfg = preset(name, "diffguard.num_steps=10", "diffguard.depth=6", *overrides)
    images, ids = mixed(benchmark)
    first = pipeline(cfg)(images, ids)["pred"]
    if cfg.diffguard.runtime.autocast != "none":  # autocast on "cuda" really runs in low precision
        fp32 = preset(name, "diffguard.num_steps=10", "diffguard.depth=6", *overrides, "diffguard.runtime.autocast=none")
        with simulated_cuda():
            low, full = (pipeline(c).to("cuda")(images.cuda(), ids)["scores"]["l2"].cpu() for c in (cfg, fp32))
        assert not torch.equal(low, full) and float(((low - full).abs() / full).median()) < 0.05
    oracle = torch.where(torch.arange(len(ids)) % 3 == 0, (first + 1) % 6, -1)  # a third re-synthesised
    cpu, _ = run_both(pipeline(cfg), pipeline(cfg), images, ids, oracle)
    assert not torch.equal(cpu["oracle_scores"]["ind"]["l2"], cpu["scores"]["l2"])
    if cfg.diffguard.aes.enabled:  # samples stop at different depths: the general loop ran too
        assert len(set(cpu["depth"].tolist())) > 1


@pytest.mark.parametrize("name", ["unet_kl", "dit_vq"])
def test_latent_pipeline_on_the_simulated_gpu_equals_the_cpu(benchmark, latent_stack, name):
    cfg = preset("digits_classifier_free.yaml", "diffguard.num_steps=6", "diffguard.depth=3",
                 "diffguard.reference=unguided")
    images, ids = mixed(benchmark, per_set=1)
    run_both(pipeline(cfg, load_diffusion(latent_stack / name)), pipeline(cfg, load_diffusion(latent_stack / name)),
             images, ids)


def host_reads(cfg, images, ids):
    """Reads back to the host during one pipeline call on the simulated GPU (after a first call), by kind."""
    pipe = pipeline(cfg)
    with simulated_cuda() as sim:
        pipe.to("cuda")
        x = images.to("cuda")
        pipe(x, ids)
        before = sim.syncs
        pipe(x, ids)
        return collections.Counter(sim.sync_calls[before:])


def reads_by_depth(name, overrides, images, ids):
    return [sum(host_reads(preset(name, f"diffguard.depth={d}", "diffguard.aes.min_depth=1", *overrides),
                           images, ids).values()) for d in (3, 6)]


@pytest.mark.parametrize("name, overrides", [
    ("digits_gdm.yaml", ["diffguard.aes.record_curves=true", "diffguard.reference=unguided"]),
    ("digits_classifier_free.yaml", []),
], ids=["gdm_curves_reference", "classifier_free_dsg"])
def test_host_reads_per_batch_do_not_grow_with_the_depth(benchmark, name, overrides):
    """The CPU twin of benchmarks/perf/sync_check.py: a fixed number of device-to-host reads per batch."""
    images, ids = mixed(benchmark)
    shallow, deep = reads_by_depth(name, overrides, images, ids)
    assert shallow == deep > 0


def test_host_read_count_sees_a_read_per_step(benchmark, monkeypatch):
    """The count is not blind: AES reads its stop rule once per step by design, and a NaN check read back
    at every denoiser call (what the pipeline avoids) shows up too."""
    images, ids = mixed(benchmark)
    shallow, deep = reads_by_depth("digits_gdm.yaml", ["diffguard.aes.enabled=true", "diffguard.aes.psnr=1"],
                                   images, ids)
    assert deep == shallow + 3  # one stop-rule read per extra inversion step (no sample stops at PSNR 1 dB)
    original = DiffusionModel.eps

    def eager_check(self, x, t, class_labels=None, check_finite=True):
        eps = original(self, x, t, class_labels, check_finite=False)
        assert bool(torch.isfinite(eps).all())
        return eps

    monkeypatch.setattr(DiffusionModel, "eps", eager_check)
    shallow, deep = reads_by_depth("digits_gdm.yaml", [], images, ids)
    assert deep == shallow + 6  # 3 more inversion and 3 more synthesis calls


def test_a_tensor_left_on_the_cpu_fails_on_the_simulated_gpu(benchmark, monkeypatch):
    cfg = preset("digits_gdm.yaml", "diffguard.num_steps=4", "diffguard.depth=2")
    tables = Ladder.on  # the coefficient tables built on the CPU whatever the device
    monkeypatch.setattr(Ladder, "on", lambda self, device, dtype: tables(self, torch.device("cpu"), dtype))
    pipe = pipeline(cfg)
    pipe(benchmark.test.images[:2], benchmark.test.ids[:2])  # fine on the CPU
    with simulated_cuda(), pytest.raises(RuntimeError, match="same device"):
        pipe.to("cuda")(benchmark.test.images[:2].cuda(), benchmark.test.ids[:2])


# --------------------------------------------------------------------------- Lightning entry points


def use_simulated_gpu(monkeypatch, module):
    """Make ``module.trainer_kwargs`` hand Lightning a simulated-GPU strategy; returns the strategies made."""
    made, original = [], lightning_setup.trainer_kwargs

    def kwargs(t, training=False):
        out = original(t, training)
        out.pop("accelerator")
        made.append(simulated_gpu_strategy())
        out["strategy"] = made[-1]
        return out

    monkeypatch.setattr(module, "trainer_kwargs", kwargs)
    return made


def test_evaluate_on_the_simulated_gpu_equals_the_cpu(tmp_path, benchmark, monkeypatch):
    argv = [f"--config={ROOT / 'conf' / 'digits_gdm.yaml'}", "limit_per_set=4", "diffguard.num_steps=6",
            "diffguard.depth=4", "data.eval_batch_size=16", "trainer.enable_progress_bar=false", "oracle=ind",
            "diffguard.reference=unguided", "diffguard.aes.enabled=true", "diffguard.aes.psnr=12",
            "diffguard.aes.min_depth=1", "callbacks.reconstructions=2", f"models.classifier={CHECKPOINTS / 'classifier'}",
            f"models.diffusion={CHECKPOINTS / 'diffusion_uncond'}"]
    cpu = eval_job.evaluate(config_lib.load(EvalConfig, argv + [f"output_dir={tmp_path / 'cpu'}"], None), benchmark)
    strategies = use_simulated_gpu(monkeypatch, lightning_setup)
    with simulated_cuda():
        gpu = eval_job.evaluate(config_lib.load(EvalConfig, argv + [f"output_dir={tmp_path / 'gpu'}"], None),
                                  benchmark)
    (strategy,) = strategies
    assert strategy.seen and all(seen == ({"cuda:0"}, {"cuda:0"}) for seen in strategy.seen)
    assert (tmp_path / "cpu" / "scores.csv").read_text() == (tmp_path / "gpu" / "scores.csv").read_text()
    assert cpu["detectors"] == gpu["detectors"]
    assert (tmp_path / "gpu" / "reconstructions" / "ind.png").is_file()  # the callbacks ran on the device's tensors


@pytest.mark.parametrize("files, extra", [
    ("train_classifier_finetune.yaml", []),
    ("train_joint.yaml", []),
    ("train_diffusion_cond.yaml", ["diffusion.block_out_channels=[32,32]", "diffusion.attention_levels=[false,true]",
                                   "diffusion.layers_per_block=1"]),
], ids=["finetune", "joint", "diffusion"])
@pytest.mark.training
def test_training_on_the_simulated_gpu_equals_the_cpu(tmp_path, benchmark, monkeypatch, files, extra):
    argv = [f"--config={ROOT / 'conf' / files}", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
            "trainer.limit_val_batches=1", "data.batch_size=8", "trainer.log_every_n_steps=1", *extra]
    cpu = train_job.train(config_lib.load(TrainConfig, argv + [f"output_dir={tmp_path / 'cpu'}"], None), benchmark)
    strategies = use_simulated_gpu(monkeypatch, train_job)
    with simulated_cuda():
        gpu = train_job.train(config_lib.load(TrainConfig, argv + [f"output_dir={tmp_path / 'gpu'}"], None), benchmark)
    assert strategies[0].seen and all(seen == ({"cuda:0"}, {"cuda:0"}) for seen in strategies[0].seen)
    assert cpu == gpu
    for exported in ("classifier/model.safetensors", "diffusion/unet/diffusion_pytorch_model.safetensors"):
        if (tmp_path / "cpu" / exported).exists():
            assert (tmp_path / "cpu" / exported).read_bytes() == (tmp_path / "gpu" / exported).read_bytes()


# --------------------------------------------------------------------------- the benchmark script


@pytest.mark.slow
def test_throughput_script_runs_its_cuda_path(tmp_path):
    """benchmarks.perf.throughput --device cuda end to end, the paper-scale part as benchmarks/perf/gpu_check.sh runs
    it (its torch.cuda calls answered by the simulator; the floor skipped: on a CPU its matmul rate would time
    4096 x 8192 products). The simulator patches torch in this process, so the script's main runs here."""
    with simulated_cuda(cuda_api=True):
        report = throughput.main(["--device", "cuda", "--images", "4", "--batch-size", "4", "--repeats", "1",
                                  "--no-floor", "--scaling", "1,2", "--scaling-images", "2", "--json",
                                  str(tmp_path / "t.json"), "diffguard.num_steps=4", "diffguard.depth=2"])
        paper = throughput.main(["--paper-scale", "--tiny-arch", "--device", "cuda", "--images", "2", "--no-floor",
                                 "--paths", "gdm,classifier_free_dsg", "diffguard.num_steps=3", "diffguard.depth=2",
                                 "diffguard.runtime.channels_last=true", "diffguard.runtime.autocast=bf16"])
    assert report["device"] == paper["device"] == "simulated CUDA (CPU)"
    assert set(report["paths"]) == {"gdm", "gdm_aes", "classifier_free_dsg"}
    assert set(paper["paths"]) == {"gdm", "classifier_free_dsg"}
    for path in list(report["paths"].values()) + list(paper["paths"].values()):
        assert path["overhead_ratio"] > 0 and path["unet_evals_per_image"] > 0
    assert json.loads((tmp_path / "t.json").read_text())["paths"].keys() == report["paths"].keys()
