"""Measuring the machine: device synchronisation, best-of timings, peak memory, and the dense matrix-product rate
that speed figures are compared with (evaluate.py records it beside its timing through :func:`describe_machine`;
benchmarks/perf/throughput.py uses :func:`matmul_rate` for its FLOP floor)."""

from __future__ import annotations

import resource
import time

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a timing must end after it); no-op on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a new CUDA peak-memory window for :func:`peak_mb`; no-op on a CPU (its peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset, or the process's peak RSS on a CPU (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best_time(fn, device: torch.device, repeats: int) -> float:
    """The fastest of ``repeats`` synchronised timings of ``fn()`` (seconds), after one untimed warm-up call."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


COMPUTE_DTYPES = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """The device's dense matrix-product rate (FLOP/s) in ``dtype``: the best of five timings at two sizes.

    Each timing repeats the product for at least about 4 GFLOP (CPU) or 10 TFLOP (CUDA), so short products
    are not dominated by the timer.
    """
    sizes, work = ((4096, 8192), 1e13) if device.type == "cuda" else ((1024, 2048), 4e9)
    g = torch.Generator().manual_seed(0)
    # On CUDA, float32 convolutions run in TF32 by default (cudnn.allow_tf32): rate the products the same way.
    tf32 = device.type == "cuda" and dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32 or before
    try:
        return _best_matmul_rate(device, dtype, sizes, work, g)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _best_matmul_rate(device, dtype, sizes, work, g) -> float:
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))
        reps = max(1, round(work / (2 * n**3)))

        def run(a=a, b=b, reps=reps):
            for _ in range(reps):
                torch.mm(a, b)

        best = max(best, 2 * n**3 * reps / best_time(run, device, repeats=5))
    return best


def describe_machine(device: torch.device) -> dict:
    """The device and its fp32 matrix-product rate (GFLOP/s), measured now (about a second on a CPU)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "threads": torch.get_num_threads(),
            "fp32_matmul_gflops": matmul_rate(device, torch.float32) / 1e9}
