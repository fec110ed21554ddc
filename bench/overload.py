"""Overload: goodput, latency and memory when offered 1x, 2x and 4x capacity.

Two targets, each a real process tree on this machine:

- the encoder, EmbedImages with one 640x480 JPEG per call;
- the gateway, SearchImages by text (a fresh text per call, so the text cache
  misses), over the encoder and one index shard.

For each: the unloaded latency (one call at a time), the capacity (items/s of 8
closed-loop clients), then open-loop Poisson arrivals at 1x, 2x and 4x that
capacity. Every call carries a deadline of 3x the unloaded p99, as a client
with a latency objective would. Reported per load: goodput (successful items/s)
against capacity, p50/p99 of the admitted (successful) calls against the
unloaded p99, how fast refusals come back, peak RSS (VmHWM) against idle RSS,
and crashes. Targets at 4x: goodput >= 0.9x capacity, admitted p99 <= 3x the
unloaded p99, peak RSS <= idle + 1 GiB, no crash.

    python -m bench.overload                      # ViT-B-32 (random weights), 60 s per load
    python -m bench.overload --quick              # 5 s per load
    python -m bench.overload --model clipsearch-tiny --seconds 2
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.common import machine, percentile, print_table, write_results
from bench.encoder_bench import jpeg
from bench.gateway_bench import start_stack
from clipsearch.encoder.v1 import encoder_service_pb2 as epb
from clipsearch.encoder.v1 import encoder_service_pb2_grpc
from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from clipsearch.gateway.v1 import gateway_service_pb2_grpc

LOADS = (1, 2, 4)
DEADLINE_FACTOR = 3.0  # client deadline, x the unloaded p99
CAPACITY_CLIENTS = 8
LAST_ERROR: dict[str, str] = {}  # the latest message of each failing code, for the results
GOODPUT_TARGET, P99_TARGET, RSS_TARGET_BYTES = 0.9, 3.0, 2**30


def rss(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(line.split()[1]) * 1024
    return found


def reset_peak(pid: int) -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so the peak is the load's own."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


class Target:
    """One service under load: how to make its n-th request and call it."""

    def __init__(self, name: str, address: str, pids: list[int], method: str, make_request, items: int = 1):
        self.name, self.address, self.pids, self.method = name, address, pids, method
        self.make_request, self.items = make_request, items


async def _call(stub_method, request, timeout: float) -> tuple[str, float]:
    started = time.perf_counter()
    try:
        await stub_method(request, timeout=timeout)
        code = "OK"
    except grpc.aio.AioRpcError as error:
        code = error.code().name
        LAST_ERROR[code] = error.details() or ""
    return code, time.perf_counter() - started


async def _with_stub(target: Target, body):
    async with grpc.aio.insecure_channel(target.address) as channel:
        stub = (encoder_service_pb2_grpc.EncoderServiceStub if target.name == "encoder"
                else gateway_service_pb2_grpc.GatewayServiceStub)(channel)
        return await body(getattr(stub, target.method))


def unloaded(target: Target, calls: int, counter: list[int]) -> list[float]:
    async def body(method):
        samples = []
        for _ in range(calls):
            code, seconds = await _call(method, target.make_request(counter), 60)
            if code != "OK":
                raise RuntimeError(f"unloaded {target.name} call failed: {code}: {LAST_ERROR[code]}")
            samples.append(seconds)
        return samples

    return asyncio.run(_with_stub(target, body))


def capacity(target: Target, seconds: float, counter: list[int]) -> float:
    async def body(method):
        done = 0
        stop = time.perf_counter() + seconds

        async def client():
            nonlocal done
            while time.perf_counter() < stop:
                code, _ = await _call(method, target.make_request(counter), 60)
                done += code == "OK"

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CAPACITY_CLIENTS)))
        return done * target.items / (time.perf_counter() - started)

    return asyncio.run(_with_stub(target, body))


def open_loop(target: Target, rate: float, seconds: float, deadline: float, counter: list[int],
              seed: int) -> tuple[list[tuple[str, float]], float]:
    """(code, seconds) per call of Poisson arrivals at ``rate`` calls/s for ``seconds``; and the wall time."""
    async def body(method):
        loop = asyncio.get_running_loop()
        rng = random.Random(seed)
        start = loop.time()
        offset, calls = 0.0, []
        while True:
            offset += rng.expovariate(rate)
            if offset >= seconds:
                break
            delay = start + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            calls.append(asyncio.ensure_future(_call(method, target.make_request(counter), deadline)))
        outcomes = await asyncio.gather(*calls)
        return outcomes, loop.time() - start

    return asyncio.run(_with_stub(target, body))


def measure(target: Target, seconds: float, unloaded_calls: int, alive) -> dict:
    counter = [0]
    base = unloaded(target, unloaded_calls, counter)
    base_p50, base_p99 = percentile(base, 50), percentile(base, 99)
    cap = capacity(target, max(seconds / 2, 1.0), counter)
    deadline = DEADLINE_FACTOR * base_p99
    levels = []
    for factor in LOADS:
        idle = sum(rss(pid)["VmRSS"] for pid in target.pids)
        for pid in target.pids:
            reset_peak(pid)
        outcomes, wall = open_loop(target, factor * cap / target.items, seconds, deadline, counter, seed=factor)
        peak = sum(rss(pid)["VmHWM"] for pid in target.pids)
        ok = [s for code, s in outcomes if code == "OK"]
        refused = [s for code, s in outcomes if code == "RESOURCE_EXHAUSTED"]
        codes: dict[str, int] = {}
        for code, _ in outcomes:
            codes[code] = codes.get(code, 0) + 1
        goodput = len(ok) * target.items / wall
        levels.append({
            "load": factor, "offered_per_s": len(outcomes) * target.items / seconds, "goodput_per_s": goodput,
            "goodput_ratio": goodput / cap, "codes": codes,
            "admitted_p50_ms": percentile(ok, 50) * 1000, "admitted_p99_ms": percentile(ok, 99) * 1000,
            "admitted_p99_ratio": percentile(ok, 99) / base_p99,
            "refused_p50_ms": percentile(refused, 50) * 1000 if refused else float("nan"),
            "idle_rss_mib": idle / 2**20, "peak_rss_mib": peak / 2**20, "rss_growth_mib": (peak - idle) / 2**20,
            "crashed": not alive(),
        })
    return {"unloaded_p50_ms": base_p50 * 1000, "unloaded_p99_ms": base_p99 * 1000, "capacity_per_s": cap,
            "deadline_ms": deadline * 1000, "levels": levels}


def run(model: str, seconds: float, workdir: Path, unloaded_calls: int) -> dict:
    """Both targets; returns their results keyed by name."""
    images = [jpeg(900_000 + i) for i in range(32)]
    results = {}
    _, shards, gateway, children = start_stack(workdir, model, "none", 1, collection="overload")
    try:
        encoder = children[0]

        def alive() -> bool:
            return all(child.proc.poll() is None for child in children)

        def image_request(counter: list[int]):
            counter[0] += 1
            return epb.EmbedImagesRequest(images=[epb.ImageInput(data=images[counter[0] % len(images)])])

        def text_request(counter: list[int]):
            counter[0] += 1
            return gpb.SearchImagesRequest(parts=[gpb.QueryPart(text=f"a photo number {counter[0]} of a red dog")],
                                           top_k=10)

        with grpc.insecure_channel(gateway.address) as channel:  # something to find
            gateway_service_pb2_grpc.GatewayServiceStub(channel).UploadImages(gpb.UploadImagesRequest(
                items=[gpb.UploadItem(data=data) for data in images[:16]]), timeout=600)
        results["encoder"] = measure(
            Target("encoder", encoder.address, [encoder.proc.pid], "EmbedImages", image_request),
            seconds, unloaded_calls, alive)
        results["gateway"] = measure(
            Target("gateway", gateway.address, [child.proc.pid for child in children], "SearchImages", text_request),
            seconds, unloaded_calls, alive)
    finally:
        for child in children:
            child.terminate(30)
    return results


def print_results(results: dict, model: str, seconds: float) -> str:
    rows = []
    for name, what in (("encoder", "encoder EmbedImages, 1 JPEG"), ("gateway", "gateway SearchImages, text")):
        r = results[name]
        for level in r["levels"]:
            codes = level["codes"]
            rows.append([what, f"{level['load']}x", level["offered_per_s"], level["goodput_per_s"],
                         level["goodput_ratio"], codes.get("OK", 0), codes.get("RESOURCE_EXHAUSTED", 0),
                         sum(v for k, v in codes.items() if k not in ("OK", "RESOURCE_EXHAUSTED")),
                         level["refused_p50_ms"], level["admitted_p50_ms"], level["admitted_p99_ms"],
                         level["admitted_p99_ratio"], level["idle_rss_mib"], level["rss_growth_mib"],
                         "yes" if level["crashed"] else "no"])
    info = machine()
    title = (f"Overload ({model} pretrained=none, {seconds:g} s per load; capacity = {CAPACITY_CLIENTS} closed-loop "
             f"clients; deadline {DEADLINE_FACTOR:g}x unloaded p99; {info['cpus']} CPUs, "
             f"{info.get('cpu_flags', '?')}): "
             + "; ".join(f"{n} capacity {results[n]['capacity_per_s']:.1f}/s, unloaded p50/p99 "
                         f"{results[n]['unloaded_p50_ms']:.1f}/{results[n]['unloaded_p99_ms']:.1f} ms"
                         for n in ("encoder", "gateway")))
    return print_table(title, ["target", "load", "offered/s", "goodput/s", "goodput/cap", "ok", "refused", "other",
                               "refused p50 ms", "ok p50 ms", "ok p99 ms", "p99/unloaded p99", "idle RSS MiB",
                               "peak-idle MiB", "crash"], rows)


def rows_at_4x(results: dict) -> list[dict]:
    """The targets at 4x as (id, what, ours, baseline, target, met, note) dicts for bench.run_all."""
    out = []
    for name in ("encoder", "gateway"):
        r = results[name]
        top = r["levels"][-1]
        note = f"{top['load']}x of {r['capacity_per_s']:.1f}/s; codes {top['codes']}"
        out += [
            ("P9", f"{name} overload 4x: goodput items/s vs capacity", top["goodput_per_s"], r["capacity_per_s"],
             f">= {GOODPUT_TARGET}x", top["goodput_ratio"] >= GOODPUT_TARGET and not top["crashed"], note),
            ("P9", f"{name} overload 4x: admitted p99 ms vs unloaded p99", top["admitted_p99_ms"],
             r["unloaded_p99_ms"], f"<= {P99_TARGET:g}x", top["admitted_p99_ratio"] <= P99_TARGET, note),
            ("P9", f"{name} overload 4x: peak RSS MiB vs idle", top["peak_rss_mib"], top["idle_rss_mib"],
             "<= idle + 1 GiB", top["rss_growth_mib"] * 2**20 <= RSS_TARGET_BYTES, "processes under load"),
        ]
    return [{**dict(zip(("id", "what", "ours", "baseline", "target", "met", "note"), row)),
             "ratio": row[2] / row[3] if row[3] else float("nan")} for row in out]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--seconds", type=float, default=0.0, help="per load (default 60; 5 with --quick)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--unloaded-calls", type=int, default=0, help="default 200; 50 with --quick")
    parser.add_argument("--out", default="", help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    seconds = args.seconds or (5.0 if args.quick else 60.0)
    calls = args.unloaded_calls or (50 if args.quick else 200)
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as workdir:
        results = run(args.model, seconds, Path(workdir), calls)
    print_results(results, args.model, seconds)
    summary = {"model": args.model, "pretrained": "none", "seconds_per_load": seconds, **results,
               "rows": rows_at_4x(results)}
    write_results("overload", summary, Path(args.out) if args.out else None)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
