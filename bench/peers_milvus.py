"""Milvus Lite for ``bench.peers``: its server binary on 127.0.0.1, driven through pymilvus.

milvus-lite 2.5 ships a native ``milvus`` server (the Milvus segment core with
knowhere) that pymilvus normally starts on a Unix socket for a ``./file.db``
URI. Here it is started directly on a TCP port of 127.0.0.1, so it is a
process of its own whose RSS we read, and pymilvus talks to it as it talks to
any Milvus server (``MilvusClient(uri="http://127.0.0.1:PORT")``).

Runs in ``.venv-peers`` (``python -m bench.peers_milvus WORKDIR``), served over
stdin/stdout by ``bench.peers_common.serve_stdio``.
"""

from __future__ import annotations

import itertools
import os
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from bench.peers_common import K, Refused, ServerProcessPeer, free_port, main

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

NPROBE_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
EF_SWEEP = (16, 32, 64, 128, 256, 512, 1024)
# pymilvus shares one connection among clients of the same URI unless each names its own alias.
CONNECTION_NUMBERS = itertools.count()


class MilvusLitePeer(ServerProcessPeer):
    system = "Milvus Lite"

    def __init__(self, workdir):
        super().__init__(workdir)
        self.uri = ""

    def start(self) -> dict:
        import milvus_lite

        lib = Path(milvus_lite.__file__).parent / "lib"
        port = free_port()
        data_dir = self.workdir / "milvus"
        data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, LD_LIBRARY_PATH=f"{lib}:{os.environ.get('LD_LIBRARY_PATH', '')}")
        self.uri = f"http://127.0.0.1:{port}"
        self.launch([str(lib / "milvus"), str(data_dir / "peers.db"), f"127.0.0.1:{port}", "ERROR"],
                    data_dir / "server.log", cwd=data_dir, env=env)
        return {"pid": self.process.pid, "port": port,
                "versions": {"milvus-lite": version("milvus-lite"), "pymilvus": version("pymilvus")}}

    def is_ready(self) -> None:
        client = self.open_client()
        client.list_collections()
        self.close_client(client)

    def configs(self) -> list[dict]:
        return [
            {"name": "FLAT", "param_name": None, "sweep": [None]},
            {"name": f"IVF_FLAT nlist {self.nlist}", "param_name": "nprobe",
             "sweep": [p for p in NPROBE_SWEEP if p <= self.nlist]},
            {"name": "HNSW M 32", "param_name": "ef", "sweep": list(EF_SWEEP)},
        ]

    @staticmethod
    def _collection(config: str) -> str:
        return "peers_" + config.split()[0].lower()

    def create(self, config: str) -> None:
        from pymilvus import DataType, MilvusException

        client = self.open_client()
        name = self._collection(config)
        if client.has_collection(name):
            client.drop_collection(name)
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        client.create_collection(name, schema=schema)
        index_type = config.split()[0]
        params = {"FLAT": {}, "IVF_FLAT": {"nlist": self.nlist}, "HNSW": {"M": 32, "efConstruction": 100}}[index_type]
        index = client.prepare_index_params()
        index.add_index("vector", index_type=index_type, metric_type="IP", params=params)
        try:
            client.create_index(name, index)
        except MilvusException as error:
            client.drop_collection(name)
            raise Refused(error.message) from None
        finally:
            self.close_client(client)

    def insert(self, config: str, start: int, vectors: np.ndarray) -> None:
        if not hasattr(self, "_writer"):
            self._writer = self.open_client()
        rows = [{"id": start + i, "vector": row} for i, row in enumerate(vectors)]
        self._writer.insert(self._collection(config), rows)

    def finish_build(self, config: str) -> None:
        name = self._collection(config)
        self._writer.flush(name)
        self._writer.load_collection(name)

    def open_client(self) -> Any:
        from pymilvus import MilvusClient

        return MilvusClient(uri=self.uri, alias=f"peers-{next(CONNECTION_NUMBERS)}")

    def close_client(self, client: Any) -> None:
        client.close()

    def search(self, client: Any, config: str, param: Any, queries: np.ndarray) -> list[list[int]]:
        param_name = {"IVF_FLAT": "nprobe", "HNSW": "ef"}.get(config.split()[0])
        search_params = {"metric_type": "IP", "params": {param_name: param} if param_name and param else {}}
        found = client.search(self._collection(config), data=queries.tolist(), limit=K,
                              search_params=search_params, anns_field="vector")
        return [[hit["id"] for hit in hits] for hits in found]


if __name__ == "__main__":
    main(MilvusLitePeer)
