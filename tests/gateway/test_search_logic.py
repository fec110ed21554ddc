"""Unit tests of the gateway's pure search logic (no services)."""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.errors import InvalidArgument
from gateway.search import (
    Candidate, PageTokens, aggregate_max, combine_mean, cut_min_score, digest, mmr, page, rocchio, unit,
)


def units(rng, n, d=16):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_mean_is_exact_for_inner_product():
    rng = np.random.default_rng(0)
    parts = units(rng, 3)
    weights = [1.0, 2.0, 0.5]
    database = units(rng, 50)
    q = combine_mean(parts, weights)
    assert np.isclose(np.linalg.norm(q), 1.0)
    # Ranking by <q, v> equals ranking by the weighted sum of the part scores.
    by_q = np.argsort(-(database @ q))
    by_parts = np.argsort(-(database @ parts.T @ np.array(weights)))
    assert list(by_q) == list(by_parts)


def test_mean_of_opposite_parts_is_refused():
    v = np.eye(4, dtype=np.float32)[0]
    with pytest.raises(InvalidArgument) as err:
        combine_mean(np.stack([v, -v]), [1, 1])
    assert err.value.field == "parts"


def test_unit_rejects_zero_and_nan():
    with pytest.raises(InvalidArgument):
        unit(np.zeros(4))
    with pytest.raises(InvalidArgument):
        unit(np.array([np.nan, 1, 0, 0]))


def test_rocchio_moves_towards_positive_and_away_from_negative():
    rng = np.random.default_rng(1)
    q, pos, neg = units(rng, 3)
    moved = rocchio(q, pos[None], neg[None], 0.75, 0.25)
    assert np.isclose(np.linalg.norm(moved), 1)
    assert np.allclose(moved, unit(q + 0.75 * pos - 0.25 * neg))
    assert rocchio(q, pos[None], None, 0.75, 0.25) @ pos > q @ pos
    assert rocchio(q, None, neg[None], 0.75, 0.25) @ neg < q @ neg
    # No feedback: unchanged.
    assert np.allclose(rocchio(q, None, None, 0.75, 0.25), q)


def test_max_aggregation_keeps_best_weighted_part_score():
    a = [Candidate("x", 0.9), Candidate("y", 0.5)]
    b = [Candidate("y", 0.8), Candidate("z", 0.7)]
    merged = aggregate_max([a, b], [1.0, 1.0])
    assert [(c.id, round(c.score, 6)) for c in merged] == [("x", 0.9), ("y", 0.8), ("z", 0.7)]
    # Weight 0.5 on the second part (relative to the largest weight).
    merged = aggregate_max([a, b], [2.0, 1.0])
    assert {c.id: round(c.score, 6) for c in merged} == {"x": 0.9, "y": 0.5, "z": 0.35}


def test_min_score_cuts():
    hits = [Candidate("a", 0.9), Candidate("b", 0.4), Candidate("c", 0.1)]
    assert [c.id for c in cut_min_score(hits, 0.4)] == ["a", "b"]
    assert len(cut_min_score(hits, None)) == 3


def test_mmr_avoids_near_duplicates():
    rng = np.random.default_rng(2)
    base = units(rng, 3)
    near = base[0] + 0.01 * rng.normal(size=base.shape[1]).astype(np.float32)
    near /= np.linalg.norm(near)
    cands = [
        Candidate("a", 0.95, vector=base[0]),
        Candidate("a-dup", 0.94, vector=near),
        Candidate("b", 0.80, vector=base[1]),
        Candidate("c", 0.70, vector=base[2]),
    ]
    assert [c.id for c in mmr(cands, 3, 0.0)] == ["a", "a-dup", "b"]
    diverse = [c.id for c in mmr(cands, 3, 0.7)]
    assert diverse[0] == "a" and "a-dup" not in diverse
    # Scores are the relevance scores, untouched.
    assert {c.id: c.score for c in mmr(cands, 4, 0.7)}["a-dup"] == 0.94


def test_pagination_covers_everything_once():
    results = [Candidate(str(i), 1 - i / 100) for i in range(23)]
    seen, offset = [], 0
    while offset is not None:
        chunk, offset = page(results, offset, 5)
        seen.extend(c.id for c in chunk)
    assert seen == [c.id for c in results]


def test_page_tokens_reject_forgery_and_other_queries():
    tokens = PageTokens(b"secret")
    q = digest("query-1")
    token = tokens.issue("search", q, o=10)
    assert tokens.open(token, "search", q)["o"] == 10
    body, _, tag = token.partition(".")
    import base64, json

    forged_body = base64.urlsafe_b64encode(json.dumps({"v": 1, "k": "search", "q": q, "o": 0}).encode()).decode()
    for bad in [forged_body.rstrip("=") + "." + tag, token[:-2], "garbage", "", token + "x", "a.b.c"]:
        with pytest.raises(InvalidArgument) as err:
            tokens.open(bad, "search", q)
        assert err.value.field == "page_token"
    with pytest.raises(InvalidArgument, match="different query"):
        tokens.open(token, "search", digest("query-2"))
    with pytest.raises(InvalidArgument):
        tokens.open(token, "images", q)  # a token from another RPC
    with pytest.raises(InvalidArgument):
        PageTokens(b"another secret").open(token, "search", q)
