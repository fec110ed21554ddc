"""Chroma for ``bench.peers``: ``chroma run`` on 127.0.0.1, driven through ``chromadb.HttpClient``.

A collection's HNSW ``ef_search`` lives in its configuration
(``collection.modify(configuration={"hnsw": {"ef_search": ...}})``), not in
the query. The server keeps the HNSW index it loaded, with the ef it was
loaded with, so a new ef takes effect after a restart of the server; this
driver restarts it on the same data directory when the ef changes (the sweep
on the tuning queries does; the timed rounds run at one ef).

Runs in ``.venv-peers`` (``python -m bench.peers_chroma WORKDIR``), served over
stdin/stdout by ``bench.peers_common.serve_stdio``.
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from bench.peers_common import K, ServerProcessPeer, free_port, main

EF_SWEEP = (16, 32, 64, 128, 256, 512, 1024)
MAX_NEIGHBORS = 32  # as clipsearch's HNSW32
EF_CONSTRUCTION = 100  # Chroma's default
COLLECTION = "peers"


class ChromaPeer(ServerProcessPeer):
    system = "Chroma"

    def __init__(self, workdir):
        super().__init__(workdir)
        self.port = 0
        self.ef: int | None = None

    def start(self) -> dict:
        data_dir = self.workdir / "chroma"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        chroma = Path(sys.executable).parent / "chroma"
        self.launch([str(chroma), "run", "--path", str(data_dir), "--host", "127.0.0.1", "--port", str(self.port)],
                    self.workdir / "chroma-server.log")
        return {"pid": self.process.pid, "port": self.port, "versions": {"chromadb": version("chromadb")}}

    def is_ready(self) -> None:
        self._http().heartbeat()

    def configs(self) -> list[dict]:
        return [{"name": f"HNSW M {MAX_NEIGHBORS} efC {EF_CONSTRUCTION}", "param_name": "ef_search",
                 "sweep": list(EF_SWEEP)}]

    def create(self, config: str) -> None:
        self.ef = EF_SWEEP[0]
        self._writer = self._http().create_collection(
            COLLECTION, embedding_function=None,
            configuration={"hnsw": {"space": "ip", "max_neighbors": MAX_NEIGHBORS,
                                    "ef_construction": EF_CONSTRUCTION, "ef_search": self.ef}})

    def insert(self, config: str, start: int, vectors: np.ndarray) -> None:
        self._writer.add(ids=[str(start + i) for i in range(len(vectors))], embeddings=vectors)

    def prepare(self, config: str, param: Any) -> None:
        if param is None or param == self.ef:
            return
        self.open_client().modify(configuration={"hnsw": {"ef_search": param}})
        self.stop()
        self.start()
        self.ef = param

    def _http(self) -> Any:
        import chromadb

        return chromadb.HttpClient(host="127.0.0.1", port=self.port)

    def open_client(self) -> Any:
        """The collection's handle: queries through it are one HTTP call each."""
        return self._http().get_collection(COLLECTION)

    def search(self, client: Any, config: str, param: Any, queries: np.ndarray) -> list[list[int]]:
        found = client.query(query_embeddings=queries, n_results=K, include=[])
        return [[int(i) for i in ids] for ids in found["ids"]]


if __name__ == "__main__":
    main(ChromaPeer)
