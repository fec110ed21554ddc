"""What every system in ``bench.peers`` shares: the measurements, written once.

A ``Peer`` wraps one vector database server running in its own process on
127.0.0.1. Subclasses say how to start and stop the server, how to build each
of their index configurations and how to send one search through their own
client; this class turns that into the figures ``bench.peers`` reports:
a recall@10 sweep on the tuning queries, single-query latency and recall on
the held-out queries, queries/s with concurrent clients, and the server's
resident memory.

This module needs only numpy and the standard library, because it also runs
in the peers' virtual environment (``.venv-peers``), where the peers' drivers
(``bench.peers_milvus``, ``bench.peers_chroma``) are served over stdin/stdout
by ``serve_stdio``: one JSON request per line in, one JSON reply per line out.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench.common import recall_at_k, rss_bytes

K = 10
RECALL_TARGET = 0.95
INGEST_BATCH = 1000

# The files ``bench.peers`` writes into the work dir for every system to read.
DATA_FILES = ("base", "tuning", "tuning_exact", "heldout", "heldout_exact")



def choose_parameter(sweep: dict[Any, float], target: float = RECALL_TARGET) -> tuple[Any, bool]:
    """(the smallest swept parameter whose recall reaches ``target``, True), or, when none
    does, (the smallest parameter with the best recall, False)."""
    reaching = [param for param, recall in sweep.items() if recall >= target]
    if reaching:
        return min(reaching, key=lambda p: (p is not None, p or 0)), True
    best = max(sweep.values())
    return min((p for p, r in sweep.items() if r == best), key=lambda p: (p is not None, p or 0)), False



def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago, for servers that cannot bind port 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def die_with_parent() -> None:
    """``preexec_fn`` for server processes: the kernel kills the server when its parent dies,
    so a driver killed outright leaves no server behind."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Refused(Exception):
    """The system does not accept this configuration."""


class Peer:
    """One system under test. Subclasses implement the methods that raise NotImplementedError."""

    system = ""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.data = {name: np.load(self.workdir / f"{name}.npy", mmap_mode="r") for name in DATA_FILES}
        self.n, self.dim = self.data["base"].shape
        self.nlist = max(16, int(4 * np.sqrt(self.n)))

    # --- what each system implements -------------------------------------------------------------
    def start(self) -> dict:
        """Starts the empty server; returns {"pid", "versions"}."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def server_pid(self) -> int:
        raise NotImplementedError

    def configs(self) -> list[dict]:
        """[{"name", "param_name" (None when there is nothing to tune), "sweep": [values]}]."""
        raise NotImplementedError

    def create(self, config: str) -> None:
        """Creates the empty collection for ``config`` (raises ``Refused`` if not accepted)."""
        raise NotImplementedError

    def insert(self, config: str, start: int, vectors: np.ndarray) -> None:
        """Writes rows ``start ..`` with ids equal to their row numbers."""
        raise NotImplementedError

    def finish_build(self, config: str) -> None:
        """Whatever the system needs after the writes before it searches its index (flush, train, load)."""

    def prepare(self, config: str, param: Any) -> None:
        """Makes ``param`` the search parameter where it is not per request (Chroma)."""

    def open_client(self) -> Any:
        raise NotImplementedError

    def close_client(self, client: Any) -> None:
        pass

    def search(self, client: Any, config: str, param: Any, queries: np.ndarray) -> list[list[int]]:
        """Top-k ids of each query row, in one call."""
        raise NotImplementedError

    # --- the measurements, the same for every system ---------------------------------------------
    def rss(self) -> int:
        return rss_bytes(self.server_pid())

    def build(self, config: str) -> dict:
        """Creates and fills ``config``'s collection; ingest and time-to-searchable seconds and the
        server's RSS growth. {"accepted": False, "error"} when the system refuses the config."""
        rss_before = self.rss()
        try:
            self.create(config)
        except Refused as refused:
            return {"accepted": False, "error": str(refused)}
        base = self.data["base"]
        started = time.perf_counter()
        for start in range(0, self.n, INGEST_BATCH):
            self.insert(config, start, np.ascontiguousarray(base[start:start + INGEST_BATCH]))
        ingested = time.perf_counter()
        self.finish_build(config)
        client = self.open_client()
        try:
            self.search(client, config, None, np.ascontiguousarray(self.data["heldout"][:1]))
        finally:
            self.close_client(client)
        searchable = time.perf_counter()
        return {"accepted": True, "ingest_s": ingested - started, "searchable_s": searchable - started,
                "ingest_vectors_per_s": self.n / (ingested - started),
                "rss_growth_bytes": self.rss() - rss_before}

    def tune(self, config: str, sweep: Sequence[Any]) -> dict:
        """Recall@10 on the tuning queries for each value of ``sweep`` in order, stopping at the first
        that reaches the target; the chosen parameter (see ``choose_parameter``)."""
        queries, exact = np.ascontiguousarray(self.data["tuning"]), self.data["tuning_exact"]
        recalls: dict[Any, float] = {}
        for param in sweep:
            self.prepare(config, param)
            client = self.open_client()
            try:
                recalls[param] = recall_at_k(self.search(client, config, param, queries), exact)
            finally:
                self.close_client(client)
            if recalls[param] >= RECALL_TARGET:
                break
        param, reached = choose_parameter(recalls)
        return {"sweep": [[p, r] for p, r in recalls.items()], "param": param, "reached_target": reached}

    def latency(self, config: str, param: Any, warmup: int = 5) -> dict:
        """Seconds per single-query call over the held-out queries, one client, and their recall@10."""
        self.prepare(config, param)
        queries, exact = np.ascontiguousarray(self.data["heldout"]), self.data["heldout_exact"]
        client = self.open_client()
        try:
            for query in queries[:warmup]:
                self.search(client, config, param, query[None, :])
            samples, found = [], []
            for query in queries:
                started = time.perf_counter()
                hits = self.search(client, config, param, query[None, :])
                samples.append(time.perf_counter() - started)
                found.append(hits[0])
        finally:
            self.close_client(client)
        return {"seconds": samples, "recall": recall_at_k(found, exact)}

    def throughput(self, config: str, param: Any, clients: int, queries_per_client: int) -> dict:
        """Queries/s with ``clients`` threads, each with its own client connection, each sending
        ``queries_per_client`` single-query calls back to back (different held-out queries)."""
        self.prepare(config, param)
        queries = np.ascontiguousarray(self.data["heldout"])
        connections = [self.open_client() for _ in range(clients)]
        gate = threading.Barrier(clients + 1)
        errors: list[BaseException] = []

        def run(index: int) -> None:
            client = connections[index]
            try:
                self.search(client, config, param, queries[index:index + 1])  # warm this connection
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)
            gate.wait()
            if errors:
                return
            try:
                for i in range(queries_per_client):
                    row = (index * queries_per_client + i) % len(queries)
                    self.search(client, config, param, queries[row:row + 1])
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
        try:
            for thread in threads:
                thread.start()
            gate.wait()
            started = time.perf_counter()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
        finally:
            for client in connections:
                self.close_client(client)
        if errors:
            raise errors[0]
        return {"qps": clients * queries_per_client / elapsed, "clients": clients}


class ServerProcessPeer(Peer):
    """A peer whose server is a child process this driver starts (``launch``) and stops."""

    def __init__(self, workdir):
        super().__init__(workdir)
        self.process: subprocess.Popen | None = None

    def launch(self, command: list[str], log_path: Path, **popen_args) -> None:
        """Starts the server and waits until ``is_ready()`` answers."""
        self.process = subprocess.Popen(command, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                                        preexec_fn=die_with_parent, **popen_args)
        deadline = time.monotonic() + 60.0
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.system} exited with code {self.process.returncode}")
            try:
                self.is_ready()
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def is_ready(self) -> None:
        """Raises while the server does not answer yet."""
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def server_pid(self) -> int:
        return self.process.pid


def serve_stdio(peer: Peer) -> None:
    """Answers ``{"method": name, "args": {...}}`` lines on stdin with ``{"result": ...}`` or
    ``{"error": ...}`` lines; stops the server on EOF, SIGTERM or Ctrl-C. Anything the libraries
    print goes to stderr, so stdout carries only replies."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        for line in sys.stdin:
            request = json.loads(line)
            try:
                reply = {"result": getattr(peer, request["method"])(**request.get("args", {}))}
            except Exception as error:  # noqa: BLE001 - the caller decides
                traceback.print_exc()
                reply = {"error": f"{type(error).__name__}: {error}"}
            replies.write(json.dumps(reply) + "\n")
            replies.flush()
    except KeyboardInterrupt:
        pass
    finally:
        peer.stop()


def main(peer_class: type[Peer]) -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m {peer_class.__module__} WORKDIR  (driven by bench.peers)")
    serve_stdio(peer_class(sys.argv[1]))
