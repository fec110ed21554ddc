"""Retrieval metrics on hand-made rankings with known values."""

from __future__ import annotations

import math

import pytest

from clipsearch.eval import mean_metrics, ndcg_at_k, query_metrics, recall_at_k, reciprocal_rank

RANKING = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"]


def test_first_hit_at_rank_three():
    relevance = {"c": 1}
    assert recall_at_k(RANKING, relevance, 1) == 0.0
    assert recall_at_k(RANKING, relevance, 5) == 1.0
    assert reciprocal_rank(RANKING, relevance) == pytest.approx(1 / 3)
    # one relevant item: NDCG = (1 / log2(4)) / (1 / log2(2)) = 0.5
    assert ndcg_at_k(RANKING, relevance, 10) == pytest.approx(0.5)


def test_perfect_ranking():
    relevance = {"a": 1, "b": 1}
    assert query_metrics(RANKING, relevance) == {"recall@1": 1.0, "recall@5": 1.0, "mrr": 1.0, "ndcg@10": 1.0}


def test_nothing_relevant_ranked():
    relevance = {"zzz": 1}
    assert query_metrics(RANKING, relevance) == {"recall@1": 0.0, "recall@5": 0.0, "mrr": 0.0, "ndcg@10": 0.0}


def test_hit_beyond_five_and_beyond_ten():
    assert recall_at_k(RANKING, {"f": 1}, 5) == 0.0
    assert reciprocal_rank(RANKING, {"f": 1}) == pytest.approx(1 / 6)
    assert ndcg_at_k(RANKING, {"k": 1}, 10) == 0.0  # rank 11 is outside the cut
    assert reciprocal_rank(RANKING, {"k": 1}) == pytest.approx(1 / 11)


def test_binary_ndcg_with_two_relevant():
    # relevant at ranks 2 and 4: DCG = 1/log2(3) + 1/log2(5); ideal = 1 + 1/log2(3)
    expected = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(RANKING, {"b": 1, "d": 1}, 10) == pytest.approx(expected)
    assert expected == pytest.approx(0.6509209298071325)


def test_more_relevant_than_k_caps_the_ideal():
    relevance = {key: 1 for key in RANKING}  # 12 relevant, every one of the top 10 is relevant
    assert ndcg_at_k(RANKING, relevance, 10) == pytest.approx(1.0)


def test_graded_ndcg():
    # grades: b=3 at rank 2, c=1 at rank 3. DCG = 3/log2(3) + 1/log2(4); ideal = 3/log2(2) + 1/log2(3)
    expected = (3 / math.log2(3) + 0.5) / (3 + 1 / math.log2(3))
    assert ndcg_at_k(RANKING, {"b": 3, "c": 1}, 10) == pytest.approx(expected)


def test_mean_over_queries():
    per_query = [query_metrics(RANKING, {"a": 1}), query_metrics(RANKING, {"c": 1})]
    means = mean_metrics(per_query)
    assert means["recall@1"] == pytest.approx(0.5)
    assert means["recall@5"] == pytest.approx(1.0)
    assert means["mrr"] == pytest.approx((1 + 1 / 3) / 2)
    assert means["ndcg@10"] == pytest.approx(0.75)
    with pytest.raises(ValueError):
        mean_metrics([])
