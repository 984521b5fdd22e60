"""Shared pieces of the tools/bench_*.py scripts: interleaved timing, medians, tables, JSON results, the machine.

Not a benchmark itself. The machine these numbers come from may be shared, so every comparison runs its candidates
interleaved (ABAB...) in one process or one run and reports medians and ratios, never absolute claims.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench_results"
WORKER_MARK = "BENCH_RESULT "  # a worker subprocess prints one line: this mark, then its JSON
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def pin_threads(argv: Sequence[str] | None = None, default: int = 1) -> int:
    """Set the BLAS/OpenMP thread count from `--threads N` (0 = library defaults), then import forge_mlx (which
    preloads OpenBLAS); call it before anything imports mlx or torch.

    On a shared machine both libraries are far steadier on one thread: with two, torch's OpenMP workers spin-wait
    behind other processes (10-20x slower SVDs were seen) and OpenBLAS loses ~30 %. Subprocesses inherit it.
    """
    if "mlx.core" in sys.modules:
        raise RuntimeError("pin_threads() must run before mlx is imported (OpenBLAS preload, thread count)")
    argv = sys.argv[1:] if argv is None else argv
    threads = default
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            threads = int(argv[i + 1])
        elif arg.startswith("--threads="):
            threads = int(arg.split("=", 1)[1])
    if threads > 0:
        for var in THREAD_VARS:
            os.environ[var] = str(threads)
    import forge_mlx  # noqa: F401  (preloads OpenBLAS for mlx with the thread count above)

    return threads


def torch_threads(threads: int) -> None:
    """torch's intra-op threads to match pin_threads (torch reads OMP_NUM_THREADS, set it too to be sure)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def interleaved(candidates: dict[str, Callable[[], float]], reps: int, log=print) -> dict[str, list[float]]:
    """Run each candidate once per round, `reps` rounds (A B C A B C ...); each call returns its own seconds."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for rep in range(reps):
        for name, run in candidates.items():
            times[name].append(run())
            log(f"  [{rep + 1}/{reps}] {name}: {times[name][-1]:.3f} s")
    return times


def timed(fn: Callable[[], object], sync: Callable[[object], object] = lambda out: out) -> float:
    """Seconds for fn() including `sync` of its result (mx.eval for lazy MLX arrays)."""
    start = time.perf_counter()
    sync(fn())
    return time.perf_counter() - start


class StepClock:
    """Wraps a training loop's batch iterator: the time between two requests is one step (forward, backward,
    update, bookkeeping), whichever loop asks. `shape(batch)` -> (rows, T, real tokens) describes a batch."""

    def __init__(self, batches: Iterator, shape):
        self.batches, self.shape = batches, shape
        self.marks: list[float] = []
        self.shapes: list[tuple[int, int, int]] = []

    def __iter__(self):
        return self

    def __next__(self):
        self.marks.append(time.perf_counter())
        batch = next(self.batches)
        self.shapes.append(self.shape(batch))
        return batch

    def finish(self) -> None:
        """Close the last step when the loop returns (its interval also holds the loop's final save)."""
        self.marks.append(time.perf_counter())

    def steps(self) -> list[dict]:
        """Every step; `warm` is False for the first step, the first of each (rows, T) shape and the last."""
        seen, out = set(), []
        for i in range(len(self.marks) - 1):
            rows, length, real = self.shapes[i]
            last = i == len(self.marks) - 2
            out.append(
                {
                    "seconds": self.marks[i + 1] - self.marks[i],
                    "rows": rows,
                    "T": length,
                    "real": real,
                    "warm": i > 0 and (rows, length) in seen and not last,
                }
            )
            seen.add((rows, length))
        return out


def summarize(steps: list[dict]) -> dict:
    """Tokens/s over warm steps (all steps after the first if fewer than 3 are warm): total = rows x T of the
    padded batch, effective = real (non-padding) tokens; positions = rows x (T - 1) feed the FLOP count."""
    warm = [s for s in steps if s["warm"]]
    used = warm if len(warm) >= 3 else steps[1:] or steps
    seconds = sum(s["seconds"] for s in used)
    total = sum(s["rows"] * s["T"] for s in used)
    real = sum(s["real"] for s in used)
    positions = sum(s["rows"] * (s["T"] - 1) for s in used)
    return {
        "steps_timed": len(used),
        "step_s": median([s["seconds"] for s in used]),
        "total_tok_s": total / seconds,
        "effective_tok_s": real / seconds,
        "positions_per_s": positions / seconds,
        "padding": 1 - real / total,
    }


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(ours: float, theirs: float) -> float:
    """ours / theirs; < 1 means ours took less (for times) or gave less (for errors)."""
    return ours / theirs if theirs else float("nan")


def fmt(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 or abs(value) >= 1e5 else f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], digits: int = 3) -> str:
    """A Markdown table (printed as is, and pasted into docs/BENCHMARKS.md)."""
    cells = [[str(h) for h in headers]] + [[fmt(v, digits) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine() -> dict:
    """What the numbers were measured on: cores, CPU, load, library versions, measured matmul peak."""
    from forge_mlx import doctor

    info = doctor.report(measure=True)
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model() or info["device_name"],
        "platform": info["platform"],
        "device": info["device"],
        "blas": info["blas"],
        "mlx": info["mlx"],
        "mlx_lm": info["mlx_lm"],
        "torch": info["torch"].get("version"),
        "matmul_fp32_gflops": info["matmul_fp32_gflops"],
        "threads": os.environ.get("OPENBLAS_NUM_THREADS", "library default"),
        "load_average_at_start": list(os.getloadavg()),
    }


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def write_results(name: str, payload: dict) -> Path:
    """bench_results/<name>-<UTC time>.json plus <name>-latest.json; returns the timestamped path."""
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    payload = {"benchmark": name, "utc": stamp, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), **payload}
    text = json.dumps(payload, indent=1, default=str)
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(text)
    (RESULTS / f"{name}-latest.json").write_text(text)
    return path


def blas_env() -> dict[str, str]:
    """Environment for an mlx subprocess that does not import forge_mlx: OpenBLAS preloaded (MLX's bundled
    reference BLAS is ~30x slower on Linux), so an anchor is not handicapped."""
    from forge_mlx import fastblas

    env = dict(os.environ)
    found = fastblas.find_fast_blas()
    if found and sys.platform.startswith("linux"):
        env["LD_PRELOAD"] = ":".join([*found, *filter(None, [env.get("LD_PRELOAD")])])
    return env


def run_worker(args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 1800) -> dict:
    """Run `python <args>` and return the JSON the worker printed after WORKER_MARK; raise with its output if none."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(WORKER_MARK):
            return json.loads(line[len(WORKER_MARK) :])
    tail = (proc.stdout + proc.stderr)[-3000:]
    raise RuntimeError(f"worker {' '.join(args)} exited {proc.returncode} without a result:\n{tail}")


def emit(result: dict) -> None:
    """A worker's last line: the result JSON for run_worker."""
    print(WORKER_MARK + json.dumps(result, default=str), flush=True)


def header(title: str, info: dict) -> str:
    return (
        f"# {title}\nmachine: {info['nproc']} cores, {info['cpu']}, {info['platform']}, BLAS {info['blas']}, "
        f"threads {info['threads']}, matmul {info['matmul_fp32_gflops']} GFLOP/s fp32, "
        f"load {info['load_average_at_start'][0]:.1f} "
        f"(shared machine: timings are noisy; ratios come from interleaved runs)\n"
        f"python {platform.python_version()}, mlx {info['mlx']}, mlx-lm {info['mlx_lm']}, torch {info['torch']}"
    )
