"""Helpers every benchmark uses: timing, percentiles, tables, JSON results.

Every figure is printed next to a baseline measured in the same run, as a
ratio, because shared machines drift; absolute times come with the machine.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# The 1-minute load average when the benchmark process started (bench.common is imported first).
LOAD_AT_START = os.getloadavg()[0]


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU model and vector extensions, the FAISS
    build's SIMD level, cores, and the 1-minute load average at the start and now."""
    info = {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "cpu_flags": cpu_flags(),
            "faiss_simd": faiss_simd(), "load_1min_start": LOAD_AT_START, "load_1min_end": os.getloadavg()[0],
            "platform": platform.platform(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One line naming the machine, for table headers."""
    info = info or machine()
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    return (f"machine: {info['cpu_model']}, {info['cpus']} cores, {info['cpu_flags']}; FAISS {info['faiss_simd']}"
            f"{gpu}; load 1-min {info['load_1min_start']:.2f} at start, {info['load_1min_end']:.2f} now")


def _cpuinfo_field(name: str) -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[-1].strip() for line in text.splitlines() if line.startswith(name)), "")


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_flags() -> str:
    """The CPU's vector extensions that FAISS and torch use (AVX2, AVX-512), from /proc/cpuinfo."""
    flags = set(_cpuinfo_field("flags").split())
    if not flags:
        return "unknown"
    found = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX-512 VNNI", "avx512_vnni"))
             if flag in flags]
    return "+".join(found) or "no AVX2"


def faiss_simd() -> str:
    """The SIMD level of the loaded FAISS library: the level it runs (dynamic dispatch), the
    loader's module (swigfaiss_avx512, swigfaiss_avx2 or generic) and ``faiss.get_compile_options()``."""
    try:
        import faiss
    except ImportError:
        return "not installed"
    import sys

    loaded = sorted(name.rsplit(".", 1)[-1] for name in sys.modules if name.startswith("faiss.swigfaiss"))
    try:  # dynamic-dispatch builds (compile option DD) pick their level at run time
        level = f"runs {faiss.SIMDConfig.get_level_name()}; "
    except AttributeError:
        level = ""
    return f"{faiss.__version__} {level}built [{faiss.get_compile_options().strip()}] via {','.join(loaded) or '?'}"


def recall_at_k(found: Sequence[Sequence[int]], exact: Sequence[Sequence[int]]) -> float:
    """Mean share of each query's exact top-k (a row of ``exact``) among the ids returned for it
    (a row of ``found``; a missing hit's -1 never matches)."""
    return statistics.fmean(len({int(i) for i in row} & {int(i) for i in truth}) / len(truth)
                            for row, truth in zip(found, exact))


def rss_bytes(pid: int) -> int:
    """Resident bytes of process ``pid`` (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> list[float]:
    """Seconds per call, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def summarize_ms(samples: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(samples, 50) * 1000,
        "p99_ms": percentile(samples, 99) * 1000,
        "mean_ms": statistics.fmean(samples) * 1000,
        "n": len(samples),
    }


def alternate(rounds: int, *measures: Callable[[int], Any]) -> list[list[Any]]:
    """Runs every one of ``measures`` once per round (passing the round number), in reverse
    order every other round, so drift on a shared machine hits each alike; their results
    per measure, round by round."""
    results: list[list[Any]] = [[] for _ in measures]
    for r in range(rounds):
        order = list(enumerate(measures))
        for i, measure in (order if r % 2 == 0 else order[::-1]):
            results[i].append(measure(r))
    return results


def split_rounds(samples: Sequence[float], rounds: int) -> list[list[float]]:
    """``samples`` (taken interleaved with another path's) cut into ``rounds`` consecutive rounds."""
    size = max(1, len(samples) // rounds)
    return [list(samples[i * size:(i + 1) * size if i < rounds - 1 else len(samples)]) for i in range(rounds)]


def p50_ms_by_round(samples: Sequence[float], rounds: int) -> list[float]:
    return [percentile(chunk, 50) * 1000 for chunk in split_rounds(samples, rounds)]


def compare_rounds(ours: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """Ours vs baseline over alternating rounds (one figure per round each): the medians,
    the median of the per-round ratios, and its spread (min and max across rounds)."""
    ratios = [o / b if b else float("nan") for o, b in zip(ours, baseline)]
    return {"ours": statistics.median(ours), "baseline": statistics.median(baseline),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "rounds": len(ratios), "ours_by_round": list(ours), "baseline_by_round": list(baseline)}


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    text_rows = [[cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in text_rows)) if text_rows else len(c) for i, c in enumerate(columns)]
    lines = [f"\n## {title}", f"({machine_line()})",
             "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in text_rows]
    output = "\n".join(lines)
    print(output, flush=True)
    return output


def write_results(name: str, results: dict[str, Any], out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **results}, indent=2, default=float))
    print(f"\nwrote {path}")
    return path
