"""The index service: durable, sharded FAISS collections behind ``clipsearch.index.v1.IndexService``.

- ``store``: the SQLite (WAL) source of truth;
- ``engine`` / ``collection`` / ``shards`` / ``filters``: the engine, without gRPC
  (``from index_service.engine import IndexEngine``);
- ``servicer``: the thin gRPC layer; ``__main__``: the server process.
"""

import os

# OpenMP threads that wait at a barrier sleep instead of spinning. With the
# default (spin) policy, a 2-thread FAISS training step on a busy 2-core
# machine took 5x longer than on 1 thread (IVF16,PQ4 on 3000 vectors: 2.5 s vs
# 0.4 s); with PASSIVE both take 0.4 s. It only takes effect if set before
# FAISS (libgomp) is loaded, which importing this package first ensures.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
