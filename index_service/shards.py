"""FAISS indexes: which factory specs are supported, and how one in-process
shard adds, removes and searches (with an IDSelector for filters).

Labels inside every FAISS index are the collection's internal int64 ids.

Families:
- ``exhaustive``: Flat and flat-code indexes (``Flat``, ``PQ64``, ``SQ8``),
  wrapped in ``IndexIDMap2``. Every search scans all codes, so a selector
  gives exact filtered top-k.
- ``ivf``: ``IVF<nlist>,<codes>`` (``IVF1024,Flat``, ``IVF4096,PQ64``,
  ``IVF1024,SQ8``); native ids with a hashtable direct map (fast removes and
  reconstruct). Filtered searches widen ``nprobe`` by 1/selectivity and redo
  short queries over every list, so a selective filter still gives k hits.
- ``hnsw``: ``HNSW<M>[,Flat|,PQ..|,SQ..]`` wrapped in ``IndexIDMap2``. HNSW
  cannot remove, so retired ids stay in the graph as tombstones that a
  selector excludes, and the collection rebuilds the graph when too many pile
  up. Selective filters are answered exactly over the matching vectors.
  The spec may end in build and search parameters:
  ``HNSW32,efConstruction=80,efSearch=128`` (``efC``/``efS`` for short).

An empty spec means ``DEFAULT_INDEX_SPEC``.

Before a trainable index (IVF, PQ, SQ) is trained, each shard is a "staging"
exact ``IDMap2,Flat`` index, so search is exact at any size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import faiss
import numpy as np

from clipsearch.errors import InvalidArgument

EXAMPLE_SPECS = ("Flat", "IVF1024,Flat", "IVF4096,PQ64", "IVF1024,SQ8", "HNSW32",
                 "HNSW32,efConstruction=80,efSearch=128", "HNSW32,SQ8", "PQ64", "SQ8")
METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}

# Filtered HNSW searches that match at most this many vectors in a shard are
# answered exactly over those vectors: cheaper and exact, where graph search
# through mostly-excluded nodes would both be slow and return short lists.
HNSW_EXACT_FILTER_MAX = 20_000
# The index of a collection created without a spec, and the HNSW search and build
# defaults (a spec's efSearch=/efConstruction= override them); see README "Choosing an index".
# HNSW_DEFAULT_EF is the static efSearch: a collection whose spec sets none searches with it
# until it holds 10k vectors, then with the efSearch it calibrates on its own vectors
# (index_service/calibration.py): over 100k x 512, 384 on data from 1024 clusters (held-out
# recall@10 0.966, where 160 gave 0.918) and 64 from sqrt(n) clusters (0.986).
# Measured on clustered 512-d data (bench/index_defaults.py), recall@10 of HNSW32 on held-out
# queries: 0.909 / 0.959 / 0.968 at efSearch 64 / 128 / 160 over 500k vectors (0.986+ at 100k);
# 160 is the smallest of the sweep with 0.95 and a margin for larger collections and queries
# off the data (text queries against image vectors: 0.960 with a +0.5 shift).
# efConstruction: FAISS's 40; 80 built a graph with lower recall at the same efSearch.
DEFAULT_INDEX_SPEC = "HNSW32"
HNSW_DEFAULT_EF = 160
HNSW_DEFAULT_EF_CONSTRUCTION = 40
HNSW_MAX_EF = 4096
# Parameters a spec may end in ("name=value"), by lower-case name and short alias.
HNSW_PARAMETERS = {"efconstruction": "efConstruction", "efc": "efConstruction",
                   "efsearch": "efSearch", "efs": "efSearch"}
# Reconstruct and scan at most this many vectors at a time in exact fallbacks.
_EXACT_CHUNK = 65536
# Multiply-adds per second of one FAISS search thread, for telling cheap searches from
# expensive ones (``Shard.estimated_search_seconds``); measured here: one query over
# 1M x 512 IndexFlatIP takes ~100 ms on one thread, i.e. ~5e9 per second.
SEARCH_MACS_PER_SECOND = 5e9


def default_nprobe(nlist: int) -> int:
    """1.5 * sqrt(nlist) lists (IVF256: 24, IVF1024: 48, IVF4096: 96).

    On the clustered test data (``index_service.synthetic``, 20k x 64, spread
    1.5, 2 shards) recall@10 against Flat was 0.95-0.97 at sqrt(nlist) and
    0.975-0.98 at this default, for IVF256 and IVF1024; nprobe=1 gives 0.4-0.6."""
    return max(1, min(nlist, math.ceil(1.5 * math.sqrt(nlist))))


@dataclasses.dataclass(frozen=True)
class IndexSpec:
    """A validated FAISS factory spec for one collection, with its HNSW parameters."""

    spec: str  # as stored with the collection: the factory string, then any parameters
    dim: int
    metric: str  # "ip" or "l2"
    family: str  # "exhaustive", "ivf" or "hnsw"
    needs_training: bool
    nlist: int
    # k-means needs at least this many points; training below it is refused.
    min_train_vectors: int
    # Auto-training starts once a collection holds this many vectors.
    auto_train_vectors: int
    factory: str = ""  # the FAISS index_factory string (the spec without parameters)
    ef_search: int = 0  # HNSW: efSearch of a search that asks for none (before any calibration)
    ef_search_in_spec: bool = False  # HNSW: the spec sets efSearch, so it is never calibrated
    ef_construction: int = 0  # HNSW: candidate list size while adding vectors

    @classmethod
    def parse(cls, spec: str, dim: int, metric: str) -> "IndexSpec":
        spec = spec.strip() or DEFAULT_INDEX_SPEC
        examples = ", ".join(EXAMPLE_SPECS)
        factory, parameters = _split_parameters(spec)
        if re.search(r"(^|,)\s*(IDMap|OPQ|PCA|RR|L2norm|Pad)", factory, re.IGNORECASE):
            raise InvalidArgument(
                f"index_spec {spec!r}: id maps and pre-transforms are not supported (ids are managed by the "
                f"service); use one of: {examples}",
                field="index_spec",
            )
        try:
            index = faiss.index_factory(dim, factory, METRICS[metric])
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "not a FAISS factory string"
            raise InvalidArgument(
                f"index_spec {spec!r} is not valid for dim {dim}: {reason}. Examples: {examples}",
                field="index_spec",
            ) from None
        if isinstance(index, faiss.IndexIVF):
            family, nlist = "ivf", index.nlist
        elif isinstance(index, faiss.IndexHNSW):
            family, nlist = "hnsw", 0
        elif isinstance(index, faiss.IndexFlatCodes):
            family, nlist = "exhaustive", 0
        else:
            raise InvalidArgument(
                f"index_spec {spec!r} builds a {type(index).__name__}, which is not supported; use one of: {examples}",
                field="index_spec",
            )
        if parameters and family != "hnsw":
            raise InvalidArgument(
                f"index_spec {spec!r}: {factory!r} takes no parameters ({' and '.join(parameters)} "
                f"{'are' if len(parameters) > 1 else 'is'} for HNSW indexes only); remove them, or use an HNSW "
                f"spec such as 'HNSW32,efConstruction=80,efSearch=128'",
                field="index_spec",
            )
        codebook_size = _codebook_size(index)
        min_train = max(nlist, codebook_size, 1) if not index.is_trained else 0
        hnsw = family == "hnsw"
        return cls(
            spec=",".join([factory, *(f"{name}={value}" for name, value in parameters.items())]),
            dim=dim,
            metric=metric,
            family=family,
            needs_training=not index.is_trained,
            nlist=nlist,
            min_train_vectors=min_train,
            auto_train_vectors=max(1000, 39 * min_train) if min_train else 0,
            factory=factory,
            ef_search=parameters.get("efSearch", HNSW_DEFAULT_EF) if hnsw else 0,
            ef_search_in_spec="efSearch" in parameters,
            ef_construction=parameters.get("efConstruction", HNSW_DEFAULT_EF_CONSTRUCTION) if hnsw else 0,
        )

    @property
    def calibrates_ef_search(self) -> bool:
        """HNSW without efSearch in the spec: the collection measures its own default
        (``index_service.calibration``)."""
        return self.family == "hnsw" and not self.ef_search_in_spec

    @property
    def faiss_metric(self) -> int:
        return METRICS[self.metric]

    @functools.cached_property
    def index_type(self) -> str:
        """A short label for metrics: flat, ivf_flat, ivf_pq, hnsw, hnsw_sq, ..."""
        return re.sub(r"\d+", "", self.factory).lower().replace(",", "_")

    def empty_index(self) -> faiss.Index:
        """A fresh, untrained index built from the spec, ready for ``add_with_ids`` once trained."""
        index = faiss.index_factory(self.dim, self.factory, self.faiss_metric)
        if self.family == "hnsw":
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self.ef_search
        # Polysemous training reorders PQ codes for Hamming pre-filtering, which searches here never use,
        # and costs seconds even on tiny training sets.
        for part in (index, faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSW) else None):
            if hasattr(part, "do_polysemous_training"):
                part.do_polysemous_training = False
        if self.family != "ivf":
            index = faiss.IndexIDMap2(index)
        return index

    def staging_index(self) -> faiss.Index:
        """The exact index a trainable collection uses until it is trained."""
        return faiss.IndexIDMap2(faiss.IndexFlat(self.dim, self.faiss_metric))

    def train(self, vectors: np.ndarray, threads: int) -> faiss.Index:
        """A trained, empty index (the template every shard is cloned from)."""
        faiss.omp_set_num_threads(threads)
        index = self.empty_index()
        index.train(vectors)
        return index

    def shard_from_template(self, template: faiss.Index) -> "Shard":
        index = faiss.clone_index(template)
        if self.family == "ivf":
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
        return Shard(index, self, trained=True)

    def new_shard(self) -> "Shard":
        """An empty shard: the real index when it needs no training, else the staging index."""
        if self.needs_training:
            return Shard(self.staging_index(), self, trained=False)
        return self.shard_from_template(self.empty_index())


def _split_parameters(spec: str) -> tuple[str, dict[str, int]]:
    """("HNSW32", {"efConstruction": 80}) from "HNSW32,efC=80": the factory string and
    the trailing ``name=value`` parameters, by their canonical names."""
    parts = spec.split(",")
    first = next((i for i, part in enumerate(parts) if "=" in part), len(parts))
    factory, parameters = ",".join(parts[:first]).strip(), {}
    usage = ("parameters come last, as name=value: HNSW specs take efConstruction=N and efSearch=N, "
             "e.g. 'HNSW32,efConstruction=80,efSearch=128'")
    for part in parts[first:]:
        name, _, value = (piece.strip() for piece in part.partition("="))
        canonical = HNSW_PARAMETERS.get(name.lower())
        if "=" not in part or canonical is None:
            raise InvalidArgument(f"index_spec {spec!r}: {part.strip()!r} is not a parameter; {usage}",
                                  field="index_spec")
        if canonical in parameters:
            raise InvalidArgument(f"index_spec {spec!r} sets {canonical} twice", field="index_spec")
        if not (value.isdigit() and 1 <= int(value) <= HNSW_MAX_EF):
            raise InvalidArgument(
                f"index_spec {spec!r}: {canonical} must be a whole number from 1 to {HNSW_MAX_EF}, got {value!r}",
                field="index_spec",
            )
        parameters[canonical] = int(value)
    if parameters and not factory:
        raise InvalidArgument(f"index_spec {spec!r} has parameters but no index; {usage}", field="index_spec")
    return factory, parameters


def _codebook_size(index: faiss.Index) -> int:
    """Centroids per product-quantizer codebook that training must learn (0 when there is no PQ)."""
    holder = faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSW) else index
    pq = getattr(holder, "pq", None)
    return int(pq.ksub) if pq is not None else 0


class Shard:
    """One in-process shard: a FAISS index over the internal ids routed to it."""

    def __init__(self, index: faiss.Index, spec: IndexSpec, trained: bool):
        self.index = index
        self.spec = spec
        self.trained = trained
        self._ivf_params: dict[int, faiss.SearchParametersIVF] = {}  # unfiltered, by nprobe
        # Staging indexes are exhaustive whatever the spec says.
        self.family = spec.family if trained else "exhaustive"

    @property
    def ntotal(self) -> int:
        """Vectors in the index (HNSW: tombstones included)."""
        return self.index.ntotal

    @property
    def keeps_tombstones(self) -> bool:
        return self.family == "hnsw"

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))

    def remove(self, ids: np.ndarray) -> None:
        """Removes ids (HNSW: nothing to do, the collection tombstones them)."""
        if not len(ids) or self.keeps_tombstones:
            return
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.family == "ivf":  # the hashtable direct map only accepts an id array
            self.index.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids)))
        else:
            self.index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids)))

    @functools.cached_property
    def _code_macs(self) -> int:
        """Multiply-adds to score one stored vector: ~dim for flat and SQ codes, one table
        lookup per byte for PQ codes."""
        index = self.index
        if isinstance(index, faiss.IndexIDMap):
            index = faiss.downcast_index(index.index)
        if isinstance(index, faiss.IndexHNSW):
            index = faiss.downcast_index(index.storage)
        return min(self.spec.dim, max(int(getattr(index, "code_size", 4 * self.spec.dim)), 1))

    def estimated_search_seconds(self, n_queries: int, k: int, nprobe: int = 0, ef_search: int = 0) -> float:
        """A rough single-thread time of an unfiltered search of ``n_queries`` (a cost model
        in multiply-adds, right within a factor of ~2): enough to tell a sub-millisecond
        search from one worth a thread of its own."""
        dim, ntotal, per_code = self.spec.dim, self.index.ntotal, self._code_macs
        tables = 256 * dim if per_code < dim else 0  # PQ distance tables (per probed list for IVF)
        if self.family == "ivf":
            nlist = max(self.spec.nlist, 1)
            probe = min(nlist, nprobe or default_nprobe(nlist))
            macs = nlist * dim + probe * (ntotal / nlist * per_code + tables)
        elif self.family == "hnsw":
            macs = max(ef_search or self.spec.ef_search, k) * 64 * per_code  # ~2M neighbours per visited node
        else:
            macs = ntotal * per_code + tables
        return n_queries * macs / SEARCH_MACS_PER_SECOND

    def search(
        self,
        queries: np.ndarray,
        k: int,
        selection: "ShardSelection | None",
        nprobe: int = 0,
        ef_search: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS (distances, labels) for the top-k of each query among the selected ids.

        ``selection`` is None when every vector in the index is eligible.
        """
        if selection is not None and selection.count == 0:
            return _empty_result(len(queries), k, self.spec.metric)
        if self.family == "ivf":
            return self._search_ivf(queries, k, selection, nprobe)
        if self.family == "hnsw":
            return self._search_hnsw(queries, k, selection, ef_search)
        params = faiss.SearchParameters(sel=selection.selector) if selection is not None else None
        return self.index.search(queries, k, params=params)

    def _search_ivf(self, queries, k, selection, nprobe):
        nlist = self.spec.nlist
        probe = min(nlist, nprobe or default_nprobe(nlist))
        if selection is not None:
            # Probe 1/selectivity more lists so about as many matching vectors are scanned as without a filter.
            probe = min(nlist, math.ceil(probe * max(self.index.ntotal, 1) / selection.count))
        sel = selection.selector if selection is not None else None
        distances, labels = self.index.search(queries, k, params=self._params_ivf(probe, sel))
        wanted = min(k, selection.count if selection is not None else self.index.ntotal)
        while probe < nlist:
            if wanted <= 0 or labels[:, wanted - 1].min() >= 0:  # FAISS puts missing hits (-1) last
                break
            # Fewer than k hits in the probed lists (matches far from the query, or tiny lists):
            # probe 4x more lists for those queries, up to all of them.
            short = np.flatnonzero((labels >= 0).sum(axis=1) < wanted)
            if not len(short):
                break
            probe = min(nlist, probe * 4)
            params = faiss.SearchParametersIVF(sel=sel, nprobe=probe)
            distances[short], labels[short] = self.index.search(queries[short], k, params=params)
        return distances, labels

    def _params_ivf(self, nprobe: int, sel) -> faiss.SearchParametersIVF:
        """Search parameters; the unfiltered ones are made once per nprobe (it costs ~10 us a call)."""
        if sel is not None:
            return faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
        params = self._ivf_params.get(nprobe)
        if params is None:
            if len(self._ivf_params) >= 64:
                self._ivf_params.clear()
            params = self._ivf_params[nprobe] = faiss.SearchParametersIVF(nprobe=nprobe)
        return params

    def _search_hnsw(self, queries, k, selection, ef_search):
        ef = max(ef_search or self.spec.ef_search, k)
        if selection is None:
            return self.index.search(queries, k, params=faiss.SearchParametersHNSW(efSearch=ef))
        if selection.count <= HNSW_EXACT_FILTER_MAX:
            return self.exact_search(queries, k, selection.ids)
        ef = min(max(HNSW_MAX_EF, k), math.ceil(ef * max(self.index.ntotal, 1) / selection.count))
        params = faiss.SearchParametersHNSW(sel=selection.selector, efSearch=ef)
        distances, labels = self.index.search(queries, k, params=params)
        short = np.flatnonzero((labels >= 0).sum(axis=1) < min(k, selection.count))
        if len(short):
            distances[short], labels[short] = self.exact_search(queries[short], k, selection.ids)
        return distances, labels

    def exact_search(self, queries: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over the vectors of ``ids`` (as stored in the index)."""
        keep_max = self.spec.metric == "ip"
        heap = faiss.ResultHeap(len(queries), k, keep_max=keep_max)
        for start in range(0, len(ids), _EXACT_CHUNK):
            chunk = ids[start:start + _EXACT_CHUNK]
            vectors = self.index.reconstruct_batch(chunk)
            distances, positions = faiss.knn(queries, vectors, min(k, len(chunk)), metric=self.spec.faiss_metric)
            heap.add_result(distances, np.where(positions >= 0, chunk[np.maximum(positions, 0)], -1))
        heap.finalize()
        return heap.D, heap.I

    def memory_bytes(self) -> int:
        return index_memory_bytes(self.index)


@dataclasses.dataclass
class ShardSelection:
    """The ids one shard may return: a selector for FAISS (a bitmap over every
    internal id of the collection) and the shard's selected ids themselves."""

    selector: faiss.IDSelector
    ids: np.ndarray  # int64, ascending

    @property
    def count(self) -> int:
        return len(self.ids)


def bitmap_selector(mask: np.ndarray) -> tuple[faiss.IDSelector, np.ndarray]:
    """An ``IDSelectorBitmap`` selecting the ids where ``mask`` is true; keep the
    returned bitmap alive while the selector is in use."""
    bitmap = np.packbits(mask, bitorder="little")
    return faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap)), bitmap


def _empty_result(nq: int, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    fill = -np.inf if metric == "ip" else np.inf
    return np.full((nq, k), fill, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


def index_memory_bytes(index: faiss.Index) -> int:
    """An estimate of the bytes an index holds (codes, ids, graph links, centroids)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap2):
        # id_map (8 B) + rev_map hash entry (~32 B) per vector
        return index.ntotal * 40 + index_memory_bytes(index.index)
    if isinstance(index, faiss.IndexIVF):
        quantizer = index_memory_bytes(index.quantizer)
        direct_map = index.ntotal * 32 if index.direct_map.type != faiss.DirectMap.NoMap else 0
        return index.ntotal * (index.code_size + 8) + quantizer + direct_map
    if isinstance(index, faiss.IndexHNSW):
        hnsw = index.hnsw
        graph = hnsw.neighbors.size() * 4 + hnsw.levels.size() * 4 + hnsw.offsets.size() * 8
        return graph + index_memory_bytes(index.storage)
    if isinstance(index, faiss.IndexFlatCodes):
        return index.ntotal * index.code_size
    return index.ntotal * index.d * 4
