"""``python -m clipsearch.eval`` end to end on tiny synthetic sets: in-process and through the real stack."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clipsearch import eval as clip_eval
from clipsearch import synthetic

from .conftest import DEMO_MODEL_DIR, REPO_ROOT

METRICS = {"recall@1", "recall@5", "mrr", "ndcg@10"}


def check_result(result: dict) -> None:
    assert set(result["metrics"]) == METRICS
    assert all(0.0 <= value <= 1.0 for value in result["metrics"].values())
    assert result["num_queries"] > 0 and result["num_images"] > 0


def test_cli_synthetic_writes_json(tmp_path):
    out = tmp_path / "result.json"
    completed = subprocess.run(
        [sys.executable, "-m", "clipsearch.eval", "--synthetic", "--seed", "77", "--n", "40",
         "--model", "models/demo", "--device", "cpu", "--quiet", "--json-out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    for label in ("Recall@1", "Recall@5", "MRR", "NDCG@10"):
        assert label in completed.stdout
    result = json.loads(out.read_text())
    check_result(result)
    assert result["num_images"] == 40
    assert result["synthetic"] == {"seed": 77, "n": 40, "size": 64}


def test_dataset_files_both_formats(tmp_path):
    synthetic.write_dataset(tmp_path / "set", 24, seed=78)
    for name in ("captions.json", "queries.jsonl"):
        out = tmp_path / f"{name}.result.json"
        assert clip_eval.main(["--dataset", str(tmp_path / "set" / name), "--images", str(tmp_path / "set" / "images"),
                               "--model", str(DEMO_MODEL_DIR), "--device", "cpu", "--quiet", "--per-query",
                               "--json-out", str(out)]) == 0
        result = json.loads(out.read_text())
        check_result(result)
        assert result["num_images"] == 24
        assert len(result["per_query"]) == result["num_queries"]
    captions = json.loads((tmp_path / "set" / "captions.json").read_text())
    assert json.loads((tmp_path / "captions.json.result.json").read_text())["num_queries"] == len(captions["annotations"])


def test_queries_json_with_grades_and_stems(tmp_path):
    synthetic.write_dataset(tmp_path, 6, seed=79)
    (tmp_path / "q.json").write_text(json.dumps({"queries": [
        {"query": "a shape", "relevant": {"000001": 2, "000002.png": 1}},
        {"query": "another", "relevant": ["images/000003.png"]},
    ]}))
    dataset = clip_eval.load_dataset(tmp_path / "q.json", tmp_path)
    assert dataset.queries[0].relevance == {"images/000001.png": 2.0, "images/000002.png": 1.0}
    assert dataset.queries[1].relevance == {"images/000003.png": 1.0}
    assert dataset.relevance_note.startswith("graded")
    (tmp_path / "bad.json").write_text(json.dumps([{"query": "x", "relevant": ["nope.png"]}]))
    with pytest.raises(ValueError, match="nope.png"):
        clip_eval.load_dataset(tmp_path / "bad.json", tmp_path)


def test_usage_errors():
    with pytest.raises(SystemExit) as exc:
        clip_eval.main(["--model", "models/demo"])  # neither --dataset nor --synthetic
    assert exc.value.code == 2


def test_gateway_mode_matches_in_process(demo_gateway):
    parser = clip_eval.build_parser()
    common = ["--synthetic", "--seed", "80", "--n", "30", "--quiet"]
    through_gateway = clip_eval.run_eval(parser.parse_args(common + ["--target", demo_gateway]))
    again = clip_eval.run_eval(parser.parse_args(common + ["--target", demo_gateway]))  # uploads are idempotent
    in_process = clip_eval.run_eval(parser.parse_args(common + ["--model", str(DEMO_MODEL_DIR), "--device", "cpu"]))
    assert again["metrics"] == through_gateway["metrics"]
    check_result(through_gateway)
    assert through_gateway["ranker"]["mode"] == "gateway"
    for name in METRICS:  # the same model, searched by FAISS in the index service instead of numpy
        assert through_gateway["metrics"][name] == pytest.approx(in_process["metrics"][name], abs=0.02)
