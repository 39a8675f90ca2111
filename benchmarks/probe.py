"""Probing the machine: CPU, memory, versions, git state, BLAS, and the GEMM rates the
FLOP-rate ratios are measured against."""

from __future__ import annotations

import argparse
import glob
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from common import short_error, write_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


OPENBLAS_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]


def find_openblas() -> Optional[str]:
    for c in OPENBLAS_CANDIDATES:
        if os.path.exists(c):
            return c
    found = sorted(glob.glob("/usr/lib*/**/libopenblas*.so*", recursive=True))
    return found[0] if found else None


def maybe_reexec_with_openblas(args: argparse.Namespace, say, script: Optional[str] = None) -> None:
    """On Linux, MLX's CPU wheel ships a slow reference BLAS: re-run the main script (or
    ``script``) with OpenBLAS preloaded (once), unless it already is or ``--no-preload`` was given."""
    if not sys.platform.startswith("linux") or args.no_preload or os.environ.get("DGEMMA_BENCH_REEXEC"):
        return
    if "openblas" in os.environ.get("LD_PRELOAD", "") or openblas_loaded():
        return
    lib = find_openblas()
    if lib is None:
        say("[yellow]OpenBLAS not found: MLX will use its slow reference BLAS on this CPU "
            "(install libopenblas0-pthread, or pass --no-preload to silence this)[/]")
        return
    say(f"re-running with LD_PRELOAD={lib} (MLX's Linux CPU wheel uses a slow reference BLAS; "
        "--no-preload skips this)")
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(x for x in (lib, env.get("LD_PRELOAD", "")) if x)
    env["DGEMMA_BENCH_REEXEC"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, str(Path(script or sys.argv[0]).resolve())] + sys.argv[1:], env)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
        except Exception:
            pass
    return platform.processor() or platform.machine()


def total_memory_gb() -> Optional[float]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("mlx", "mlx-lm", "mlx-vlm", "torch", "transformers", "numpy", "dgemma-mlx"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def git_state() -> dict:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "dgemma_mlx"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": head or None, "dgemma_mlx_dirty": bool(dirty)}
    except Exception:
        return {"commit": None}


def machine_info(args) -> dict:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "cores_available": cores, "memory_gb": total_memory_gb(),
        "versions": versions(), "openblas_preloaded": bool(openblas_loaded()) if sys.platform.startswith("linux") else None,
        "ld_preload": os.environ.get("LD_PRELOAD") or None, "loadavg_start": loadavg(), "git": git_state(),
    }


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def openblas_loaded() -> Optional[bool]:
    """Whether libopenblas is mapped into this process (Linux only; None elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            return "libopenblas" in f.read()
    except OSError:
        return None


def measure_rate(fn, flop: float, runs: int = 5) -> dict:
    fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return {"best_gflops": flop / min(ts) / 1e9, "median_gflops": flop / statistics.median(ts) / 1e9}


GEMM_SHAPES = [(2048, 2048, 2048), (256, 2816, 4096)]


def machine(task: dict, out: Path) -> int:
    """Float32 GEMM rates of MLX and torch on this machine, right now."""
    res: dict = {"mlx": {}, "torch": {}}
    try:
        import mlx.core as mx

        res["mlx_device"] = str(mx.default_device())
        for m, k, n in GEMM_SHAPES:
            a = mx.random.normal((m, k))
            b = mx.random.normal((k, n))
            mx.eval(a, b)
            res["mlx"][f"{m}x{k}x{n}"] = measure_rate(lambda: mx.eval(a @ b), 2.0 * m * k * n)
    except Exception as e:
        res["mlx_error"] = short_error(e)
    try:
        import torch

        torch.set_num_threads(int(task.get("torch_threads") or 2))
        for m, k, n in GEMM_SHAPES:
            a = torch.randn(m, k)
            b = torch.randn(k, n)
            res["torch"][f"{m}x{k}x{n}"] = measure_rate(lambda: a @ b, 2.0 * m * k * n)
        res["torch_threads"] = torch.get_num_threads()
    except Exception as e:
        res["torch_error"] = short_error(e)
    res["openblas_loaded"] = openblas_loaded()
    write_json(out, res)
    return 0
