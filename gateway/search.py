"""Search logic in plain numpy: query aggregation, Rocchio feedback, MMR
re-ranking, score cut-off, and pagination with HMAC-signed page tokens.

Nothing here talks to a service; the engine feeds it vectors and hits.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from clipsearch.errors import InvalidArgument

# MMR re-ranks at most this many candidates.
MAX_CANDIDATES = 1000
# A search page token carries the ranked ids of the pages after it (at most top_k <= 1000 of them).
MAX_TOKEN_CHARS = 256 * 1024
_EPS = 1e-6


@dataclass
class Candidate:
    """One search hit on its way to the caller."""

    id: str
    score: float
    metadata: Any = None  # carried through untouched (a Metadata message)
    vector: np.ndarray | None = field(default=None, repr=False)


def unit(vector: np.ndarray, what: str = "vector", field: str | None = None) -> np.ndarray:
    """``vector`` scaled to length 1; InvalidArgument when it is zero or not finite."""
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(vector)):
        raise InvalidArgument(f"{what} has NaN or infinite values", field=field)
    norm = float(np.linalg.norm(vector))
    if norm < _EPS:
        raise InvalidArgument(f"{what} has zero length, so it has no direction to search in", field=field)
    return (vector / norm).astype(np.float32)


def combine_mean(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The normalized weighted mean of unit vectors (rows of ``vectors``).

    For inner-product search this is exact: <q, v> for q = sum(w_i u_i)/|.| ranks
    v exactly as the weighted sum of the part scores does.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32).reshape(-1, 1)
    if vectors.ndim != 2 or len(vectors) != len(w) or len(w) == 0:
        raise ValueError("combine_mean needs one weight per vector and at least one vector")
    return unit((vectors * w).sum(axis=0) / float(np.abs(w).sum()), "the weighted mean of the query parts",
                field="parts")


def rocchio(query: np.ndarray, positive: np.ndarray | None, negative: np.ndarray | None,
            positive_weight: float, negative_weight: float) -> np.ndarray:
    """Rocchio feedback: q + a * mean(positive) - b * mean(negative), renormalized."""
    moved = np.asarray(query, dtype=np.float32).copy()
    if positive is not None and len(positive):
        moved += positive_weight * np.asarray(positive, dtype=np.float32).mean(axis=0)
    if negative is not None and len(negative):
        moved -= negative_weight * np.asarray(negative, dtype=np.float32).mean(axis=0)
    return unit(moved, "the query after relevance feedback", field="feedback")


def rank(candidates: Iterable[Candidate]) -> list[Candidate]:
    """Best score first; ties broken by id so results are deterministic."""
    return sorted(candidates, key=lambda c: (-c.score, c.id))


def aggregate_max(per_part: Sequence[Sequence[Candidate]], weights: Sequence[float]) -> list[Candidate]:
    """MAX aggregation: an image's score is its best weighted part score.

    Weights are relative, scaled so the largest is 1: equal weights give the
    plain maximum of the part scores, and scores stay on the metric's scale.
    """
    if len(per_part) != len(weights):
        raise ValueError("one weight per part")
    top = max(weights)
    if top <= 0:
        raise InvalidArgument("MAX aggregation needs at least one positive part weight", field="parts")
    scale = [w / top for w in weights]
    best: dict[str, Candidate] = {}
    for hits, s in zip(per_part, scale):
        if s <= 0:
            continue
        for hit in hits:
            score = float(hit.score) * s
            known = best.get(hit.id)
            if known is None or score > known.score:
                best[hit.id] = Candidate(hit.id, score, hit.metadata, hit.vector)
    return rank(best.values())


def cut_min_score(candidates: Sequence[Candidate], min_score: float | None) -> list[Candidate]:
    if min_score is None:
        return list(candidates)
    return [c for c in candidates if c.score >= min_score]


def mmr(candidates: Sequence[Candidate], k: int, diversity: float) -> list[Candidate]:
    """Maximal marginal relevance over ``candidates`` (which carry unit vectors).

    Picks, one at a time, the candidate maximizing
    ``(1 - diversity) * score - diversity * max_similarity_to_picked``.
    diversity=0 keeps the score order; 1 picks by novelty alone (the first
    pick is still the best-scoring one). Scores are left as they were.
    """
    ranked = rank(candidates)
    if diversity <= 0 or len(ranked) <= 1:
        return ranked[:k]
    if any(c.vector is None for c in ranked):
        raise ValueError("MMR needs the candidates' vectors")
    vectors = np.stack([c.vector for c in ranked]).astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.maximum(norms, _EPS)
    relevance = np.array([c.score for c in ranked], dtype=np.float64)
    k = min(k, len(ranked))
    picked: list[int] = []
    max_sim = np.full(len(ranked), -np.inf)
    available = np.ones(len(ranked), dtype=bool)
    for _ in range(k):
        redundancy = np.where(np.isfinite(max_sim), max_sim, 0.0)
        objective = (1.0 - diversity) * relevance - diversity * redundancy
        objective[~available] = -np.inf
        best = int(np.argmax(objective))  # argmax keeps the first (best-ranked) on ties
        picked.append(best)
        available[best] = False
        max_sim = np.maximum(max_sim, vectors @ vectors[best])
    return [ranked[i] for i in picked]


# --------------------------------------------------------------------------- page tokens


class PageTokens:
    """Opaque page tokens: a small JSON payload plus an HMAC-SHA256 tag.

    The payload names the RPC and a digest of the query, so a token can only
    continue the query that produced it; any edit breaks the tag.
    """

    VERSION = 1

    def __init__(self, secret: bytes | str | None = None):
        if isinstance(secret, str):
            secret = secret.encode()
        self._secret = secret or secrets.token_bytes(32)

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body, hashlib.sha256).digest()

    def issue(self, kind: str, query: str, **state: Any) -> str:
        payload = {"v": self.VERSION, "k": kind, "q": query, **state}
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        return _b64(body) + "." + _b64(self._tag(body))

    def open(self, token: str, kind: str, query: str, field: str = "page_token") -> dict[str, Any]:
        """The state in ``token``; InvalidArgument when forged, altered or from another query."""
        bad = InvalidArgument(
            f"{field} is not a token this server issued (altered, forged or truncated); "
            "pass next_page_token from the previous response unchanged",
            field=field, reason="INVALID_PAGE_TOKEN",
        )
        body_text, dot, tag_text = token.partition(".")
        if not dot or len(token) > MAX_TOKEN_CHARS:
            raise bad
        try:
            body, tag = _unb64(body_text), _unb64(tag_text)
        except ValueError:
            raise bad from None
        if not hmac.compare_digest(tag, self._tag(body)):
            raise bad
        try:
            payload = json.loads(body)
        except ValueError:
            raise bad from None
        if not isinstance(payload, dict) or payload.get("v") != self.VERSION or payload.get("k") != kind:
            raise bad
        if payload.get("q") != query:
            raise InvalidArgument(
                f"{field} belongs to a different query; keep every field except page_token and page_size the same "
                "while paging", field=field, reason="PAGE_TOKEN_QUERY_MISMATCH",
            )
        return payload


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError(str(exc)) from None


def digest(*parts: bytes | str) -> str:
    """A short stable digest of a query, for binding page tokens to it."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:32]


def pin_ranking(candidates: Sequence[Candidate]) -> str:
    """The ids and scores of ``candidates``, packed for a page token (zlib, base64)."""
    rows = [[c.id, round(float(c.score), 6)] for c in candidates]
    return _b64(zlib.compress(json.dumps(rows, separators=(",", ":")).encode(), 6))


def unpin_ranking(text: str) -> list[Candidate]:
    """The candidates ``pin_ranking`` packed (the token's tag already vouched for them)."""
    inflater = zlib.decompressobj()
    rows = json.loads(inflater.decompress(_unb64(text), 16 * MAX_TOKEN_CHARS))
    return [Candidate(str(image_id), float(score)) for image_id, score in rows]


def within_bytes(sizes: Sequence[int], budget: int) -> int:
    """How many of the leading items fit in ``budget`` bytes (at least one, so paging always moves on)."""
    total = 0
    for count, size in enumerate(sizes):
        total += size
        if total > budget and count:
            return count
    return len(sizes)


def page(results: Sequence[Candidate], offset: int, page_size: int) -> tuple[list[Candidate], int | None]:
    """One page of ``results`` and the offset of the next one (None at the end)."""
    chunk = list(results[offset:offset + page_size])
    following = offset + page_size
    return chunk, (following if following < len(results) else None)
