"""clipsearch's index service against Milvus Lite and Chroma, on the same vectors and queries.

Each system runs as a server process of its own on 127.0.0.1 and is called
through its own client: clipsearch's index service (``python -m
index_service``) through a gRPC stub, Milvus Lite (its native server binary)
through pymilvus, Chroma (``chroma run``) through ``chromadb.HttpClient``.
The peers' client libraries live in a separate virtual environment,
``.venv-peers/``, which this script creates on first use and reuses after, so
the project's own dependencies stay clean. Their drivers (``bench.peers_milvus``,
``bench.peers_chroma``) run under that environment's python and answer JSON
requests over stdin/stdout; vectors and queries reach them as .npy files in the
work dir. Every measurement is the same code for all (``bench.peers_common.Peer``).

For each system and index configuration:

1. **Build**: ingest n vectors in batches of 1000 (vectors/s), then whatever the
   system needs before it searches its index (clipsearch: ``TrainIndex`` for
   IVF; Milvus: flush and load); time to searchable ends when the first search
   returns. Resident memory is the server's RSS growth (/proc) over that build.
2. **Tune**: recall@10 against exact search on the TUNING queries, sweeping the
   search parameter upwards (nprobe, ef); it takes the smallest value reaching
   0.95, else the one with the best recall.
3. **Rounds** (``--rounds``, default 3): single-query latency and recall@10 on
   the HELD-OUT queries at that parameter, then queries/s with 8 concurrent
   clients. Each round visits the systems in a rotated order so drift on a
   shared machine hits them alike; figures are medians over rounds.

Data: clustered unit vectors (``index_service.synthetic.GaussianMixture``)
around ``--clusters`` centres (not tied to n).

    make bench-peers                                  # 100k x 512 (~10-15 min on 2 cores)
    python -m bench.peers --n 500000                  # the full run
    python -m bench.peers --n 20000 --systems clipsearch,chroma
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import RESULTS_DIR, percentile, print_table, write_results
from bench.peers_common import K, RECALL_TARGET, Peer

REPO = Path(__file__).resolve().parents[1]
PEERS_VENV = REPO / ".venv-peers"
# milvus-lite 2.5 is the last release with the native server (3.x is pure Python and ~20x
# slower per query); it imports pkg_resources, which setuptools 81 dropped.
PEER_REQUIREMENTS = ("milvus-lite==2.5.1", "pymilvus==2.5.18", "chromadb==1.5.9", "setuptools<81", "numpy")
REMOTE_PEERS = {"milvus": "bench.peers_milvus", "chroma": "bench.peers_chroma"}
SYSTEMS = ("clipsearch", *REMOTE_PEERS)
NPROBE_SWEEP = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)
EF_SWEEP = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="base vectors (500000 is the full run)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1024, help="mixture centres (fixed, whatever n is)")
    parser.add_argument("--spread", type=float, default=2.0, help="noise norm relative to the cluster centre")
    parser.add_argument("--tuning-queries", type=int, default=300)
    parser.add_argument("--heldout-queries", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for queries/s")
    parser.add_argument("--queries-per-client", type=int, default=40)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--workdir", default="", help="data dirs and .npy files (default: a temp dir, removed after)")
    parser.add_argument("--out", default="", help="results directory (default: bench/results)")
    args = parser.parse_args(argv)
    args.systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    return args


# --- data --------------------------------------------------------------------------------------------


def write_data(workdir: Path, args: argparse.Namespace) -> None:
    """base, tuning and held-out queries, and each query set's exact top-k, as .npy files."""
    import faiss

    from index_service.synthetic import GaussianMixture

    mixture = GaussianMixture(args.dim, clusters=args.clusters, spread=args.spread, seed=0)
    base = mixture.sample(args.n, seed=1)
    exact_index = faiss.IndexFlatIP(args.dim)
    exact_index.add(base)
    np.save(workdir / "base.npy", base)
    for name, count, seed in (("tuning", args.tuning_queries, 2), ("heldout", args.heldout_queries, 3)):
        queries = mixture.sample(count, seed=seed)
        np.save(workdir / f"{name}.npy", queries)
        np.save(workdir / f"{name}_exact.npy", exact_index.search(queries, K)[1])


# --- clipsearch, in this process ---------------------------------------------------------------------


class ClipsearchPeer(Peer):
    """clipsearch's index service: ``python -m index_service`` on 127.0.0.1 port 0, gRPC stubs."""

    system = "clipsearch"

    def __init__(self, workdir):
        super().__init__(workdir)
        self.service = None

    def start(self) -> dict:
        import faiss
        import grpc

        from clipsearch.stack import ServiceProcess

        self.service = ServiceProcess("index_service", [
            "--data-dir", str(self.workdir / "clipsearch"), "--log-level", "WARNING",
            "--drain-delay-seconds", "0", "--snapshot-interval-seconds", "0", "--no-snapshot-on-shutdown",
            "--no-auto-train", "--metrics-port", "-1",
        ], self.workdir, name="peers-index").start(timeout=120)
        self.writer = self.open_client()
        return {"pid": self.service.proc.pid, "port": self.service.port,
                "versions": {"faiss": faiss.__version__, "grpcio": grpc.__version__,
                             "clipsearch": version("clipsearch")}}

    def stop(self) -> None:
        if self.service is not None:
            self.service.terminate()

    def server_pid(self) -> int:
        return self.service.proc.pid

    def configs(self) -> list[dict]:
        return [
            {"name": "Flat", "param_name": None, "sweep": [None]},
            {"name": f"IVF{self.nlist},Flat", "param_name": "nprobe",
             "sweep": [p for p in NPROBE_SWEEP if p <= self.nlist]},
            {"name": "HNSW32", "param_name": "ef_search", "sweep": list(EF_SWEEP)},
        ]

    @staticmethod
    def _collection(config: str) -> str:
        return "peers-" + config.split(",")[0].lower()

    def create(self, config: str) -> None:
        from clipsearch.index.v1 import index_service_pb2 as pb

        self.writer.stub.CreateCollection(pb.CreateCollectionRequest(
            name=self._collection(config), dim=self.dim, metric=pb.METRIC_INNER_PRODUCT, index_spec=config))

    def insert(self, config: str, start: int, vectors: np.ndarray) -> None:
        from clipsearch.index.v1 import index_service_pb2 as pb
        from clipsearch.vectors import pack_matrix

        self.writer.stub.UpsertVectors(pb.UpsertVectorsRequest(
            collection=self._collection(config), ids=[str(start + i) for i in range(len(vectors))],
            vectors=pack_matrix(vectors)))

    def finish_build(self, config: str) -> None:
        from clipsearch.index.v1 import index_service_pb2 as pb

        if config.startswith("IVF"):
            self.writer.stub.TrainIndex(pb.TrainIndexRequest(collection=self._collection(config)), timeout=3600)

    def open_client(self) -> Any:
        import grpc

        from clipsearch.index.v1 import index_service_pb2_grpc

        channel = grpc.insecure_channel(self.service.address)
        channel.stub = index_service_pb2_grpc.IndexServiceStub(channel)
        return channel

    def close_client(self, client: Any) -> None:
        client.close()

    def search(self, client: Any, config: str, param: Any, queries: np.ndarray) -> list[list[int]]:
        from clipsearch.index.v1 import index_service_pb2 as pb
        from clipsearch.vectors import pack_matrix

        params = {} if not param else {"nprobe": param} if config.startswith("IVF") else {"ef_search": param}
        reply = client.stub.SearchVectors(pb.SearchVectorsRequest(
            collection=self._collection(config), queries=pack_matrix(queries), k=K, params=params))
        return [[int(hit.id) for hit in result.hits] for result in reply.results]


# --- the peers, in .venv-peers -----------------------------------------------------------------------


def peers_python() -> Path:
    """``.venv-peers``'s python, creating the venv and installing ``PEER_REQUIREMENTS`` the first time
    (or when the requirements changed)."""
    python = PEERS_VENV / "bin" / "python"
    stamp = PEERS_VENV / ".installed"
    wanted = "\n".join(PEER_REQUIREMENTS)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"creating {PEERS_VENV} with {' '.join(PEER_REQUIREMENTS)} (once)", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEER_REQUIREMENTS], check=True)
    stamp.write_text(wanted)
    return python


class PeerError(RuntimeError):
    pass


class RemotePeer:
    """A ``Peer`` in another process (``python -m MODULE WORKDIR`` under ``.venv-peers``): each method
    call is one JSON line to its stdin and one JSON line back."""

    def __init__(self, python: Path, module: str, workdir: Path):
        self.module = module
        self.process = subprocess.Popen([str(python), "-m", module, str(workdir)], cwd=REPO, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def call(self, method: str, **args) -> Any:
        self.process.stdin.write(json.dumps({"method": method, "args": args}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise PeerError(f"{self.module} exited (code {self.process.wait()}) during {method}")
        reply = json.loads(line)
        if "error" in reply:
            raise PeerError(f"{self.module}.{method}: {reply['error']}")
        return reply["result"]

    def __getattr__(self, method: str):
        return lambda **args: self.call(method, **args)

    def stop(self) -> None:
        """Closes its stdin, on which the driver stops its server and exits."""
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                self.process.wait(10)


class LocalPeer:
    """A ``Peer`` in this process, behind the same keyword-argument calls as ``RemotePeer``."""

    def __init__(self, peer: Peer):
        self.peer = peer

    def __getattr__(self, method: str):
        return getattr(self.peer, method)

    def stop(self) -> None:
        self.peer.stop()


# --- the run -----------------------------------------------------------------------------------------


def host_facts() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 "unknown")
    return {"cpu_model": model, "load_average": list(os.getloadavg())}


def build_and_tune(peer, info: dict) -> None:
    """Builds every config of ``peer`` and tunes its search parameter; fills ``info["configs"]``."""
    for config in peer.configs():
        name = config["name"]
        print(f"[{info['system']}] building {name}", flush=True)
        try:
            built = peer.build(config=name)
        except PeerError as error:
            built = {"accepted": False, "failed": True, "error": str(error)}
        entry = info["configs"][name] = {"param_name": config["param_name"], **built}
        if not built["accepted"]:
            print(f"[{info['system']}] {name} {'failed' if built.get('failed') else 'refused'}: {built['error']}",
                  flush=True)
            continue
        entry["rss_bytes_per_vector"] = built["rss_growth_bytes"] / info["n"]
        tuned = peer.tune(config=name, sweep=config["sweep"])
        entry.update(tuning_sweep=tuned["sweep"], param=tuned["param"], reached_target=tuned["reached_target"])
        recalls = [recall for _, recall in tuned["sweep"]]
        # Milvus Lite's IVF_FLAT: the same recall at every nprobe (its search does not use the parameter).
        entry["parameter_had_no_effect"] = len(recalls) > 2 and max(recalls) - min(recalls) < 1e-9
        entry["rounds"] = []
        print(f"[{info['system']}] {name}: ingest {built['ingest_vectors_per_s']:.0f} vectors/s, searchable in "
              f"{built['searchable_s']:.1f}s; tuning sweep {tuned['sweep']} -> {config['param_name']}={tuned['param']}",
              flush=True)


def measure_round(peer, info: dict, args: argparse.Namespace) -> None:
    for name, entry in info["configs"].items():
        if not entry["accepted"]:
            continue
        timed = peer.latency(config=name, param=entry["param"])
        rate = peer.throughput(config=name, param=entry["param"], clients=args.clients,
                               queries_per_client=args.queries_per_client)
        entry["rounds"].append({"p50_ms": percentile(timed["seconds"], 50) * 1000,
                                "p99_ms": percentile(timed["seconds"], 99) * 1000,
                                "heldout_recall": timed["recall"], "qps": rate["qps"]})


def summarize(info: dict) -> None:
    for entry in info["configs"].values():
        if entry.get("rounds"):
            for key in ("p50_ms", "p99_ms", "heldout_recall", "qps"):
                entry[key] = statistics.median(r[key] for r in entry["rounds"])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="peers-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {
        "config": {"n": args.n, "dim": args.dim, "clusters": args.clusters, "spread": args.spread, "k": K,
                   "recall_target": RECALL_TARGET, "tuning_queries": args.tuning_queries,
                   "heldout_queries": args.heldout_queries, "rounds": args.rounds, "clients": args.clients,
                   "queries_per_client": args.queries_per_client},
        "host_at_start": host_facts(),
        "systems": {},
    }
    peers: dict[str, Any] = {}
    try:
        write_data(workdir, args)
        print(f"data: {args.n} x {args.dim}, {args.clusters} clusters, {args.tuning_queries} tuning and "
              f"{args.heldout_queries} held-out queries ({time.perf_counter() - started:.1f}s)", flush=True)
        for system in args.systems:
            info = results["systems"][system] = {"system": system, "n": args.n, "configs": {}}
            try:
                if system == "clipsearch":
                    peers[system] = LocalPeer(ClipsearchPeer(workdir))
                else:
                    peers[system] = RemotePeer(peers_python(), REMOTE_PEERS[system], workdir)
                started_server = peers[system].start()
                info.update(pid=started_server["pid"], versions=started_server["versions"],
                            empty_rss_bytes=peers[system].rss())
                build_and_tune(peers[system], info)
            except PeerError as error:
                info["error"] = str(error)
                print(f"[{system}] failed: {error}", flush=True)
                peers.pop(system, None)
        running = [system for system in args.systems if system in peers]
        for round_number in range(args.rounds):
            order = running[round_number % len(running):] + running[:round_number % len(running)]
            print(f"round {round_number + 1}/{args.rounds}: {', '.join(order)}", flush=True)
            for system in order:
                measure_round(peers[system], results["systems"][system], args)
        for system in running:
            info = results["systems"][system]
            info["final_rss_growth_bytes"] = peers[system].rss() - info["empty_rss_bytes"]
            collections = sum(entry["accepted"] for entry in info["configs"].values())
            info["final_rss_bytes_per_stored_vector"] = info["final_rss_growth_bytes"] / max(1, collections * args.n)
            summarize(info)
    finally:
        for peer in peers.values():
            peer.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results["host_at_end"] = host_facts()
    results["wall_s"] = time.perf_counter() - started
    print_results(results)
    write_results("peers", results, Path(args.out) if args.out else RESULTS_DIR)
    return results


def print_results(results: dict) -> None:
    rows = []
    for info in results["systems"].values():
        if "error" in info:
            rows.append([info["system"], "-", "failed: " + info["error"][:60], *["-"] * 8])
        for name, entry in info["configs"].items():
            if not entry["accepted"]:
                reason = "failed: " + entry["error"][:60] if entry.get("failed") else "refused"
                rows.append([info["system"], name, reason, *["-"] * 8])
                continue
            param = f"{entry['param_name']} {entry['param']}" if entry["param_name"] else "-"
            if entry.get("parameter_had_no_effect"):
                param += " (no effect)"
            elif not entry.get("reached_target", True):
                param += " (best)"
            rows.append([info["system"], name, param, entry.get("heldout_recall", float("nan")),
                         entry.get("p50_ms", float("nan")), entry.get("p99_ms", float("nan")),
                         entry.get("qps", float("nan")), round(entry["ingest_vectors_per_s"]),
                         entry["searchable_s"], round(entry["rss_bytes_per_vector"])])
    config = results["config"]
    print_table(
        f"{config['n']} x {config['dim']}, k={config['k']}: search parameter = smallest reaching recall@10 >= "
        f"{config['recall_target']} on {config['tuning_queries']} tuning queries; recall and latency on "
        f"{config['heldout_queries']} held-out queries; medians of {config['rounds']} rounds",
        ["system", "index", "parameter", "recall@10", "p50 ms", "p99 ms", f"QPS {config['clients']} clients",
         "ingest vec/s", "searchable s", "RSS B/vector"], rows)
    print(f"load average {results['host_at_start']['load_average']} at start, "
          f"{results['host_at_end']['load_average']} at end; {results['host_at_start']['cpu_model']}; "
          f"{results['wall_s']:.0f}s wall")


def exit_on_signal(signum, frame) -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so ``main`` stops every server it started."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGHUP, exit_on_signal)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:  # started in the background by a shell
        signal.signal(signal.SIGINT, signal.default_int_handler)
    main(sys.argv[1:])
