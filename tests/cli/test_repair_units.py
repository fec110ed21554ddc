"""SDK and CLI pieces of repair, pending collection deletion and metadata-less
search that need no server: the requests the SDK builds, how it reads the
answers, and what `clipsearch repair` prints and returns. Through a real
gateway: test_cli_repair.py."""

from __future__ import annotations

import asyncio
import datetime
import json
import subprocess
import sys

import pytest
from google.protobuf import timestamp_pb2

from clipsearch import cli, errors
from clipsearch.client import (
    AsyncClient,
    Client,
    CollectionDeletion,
    IDEMPOTENT_METHODS,
    RepairJob,
)
from clipsearch.gateway.v1 import gateway_service_pb2 as pb

CREATED = datetime.datetime(2025, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)


def repair_job_proto(**fields) -> pb.RepairJob:
    job = pb.RepairJob(**{"job_id": "r1", "collection": "pets", "state": pb.REPAIR_STATE_RUNNING, **fields})
    job.create_time.CopyFrom(timestamp_pb2.Timestamp(seconds=int(CREATED.timestamp())))
    return job


class RecordingStub:
    """Stands in for the gateway stub: records each request, answers with ``responses[method]``."""

    def __init__(self, responses: dict, asynchronous: bool = False):
        self.requests: list[tuple[str, object]] = []
        self.responses = responses
        self.asynchronous = asynchronous

    def __getattr__(self, method):
        def call(request, timeout=None, metadata=None):
            self.requests.append((method, request))
            return self.responses[method]

        async def acall(request, timeout=None, metadata=None):
            return call(request, timeout, metadata)

        return acall if self.asynchronous else call


@pytest.fixture
def client():
    with Client("127.0.0.1:1", collection="pets") as c:  # the channel connects lazily: never, here
        yield c


def test_search_without_metadata_asks_for_id_score_and_url_only(client):
    hit = pb.SearchHit(id="a", score=0.9, url="file:///a")
    client._stub = RecordingStub({"SearchImages": pb.SearchImagesResponse(hits=[hit])})
    results = client.search("a cat", with_metadata=False)
    assert results[0].id == "a" and results[0].metadata == {}
    client.search("a cat")
    (_, lean), (_, full) = client._stub.requests
    assert list(lean.read_mask.paths) == ["id", "score", "url"]
    assert not full.HasField("read_mask"), "an empty read_mask means every field"
    assert lean.parts == full.parts and lean.collection == full.collection == "pets"


def test_repair_starts_and_reads_a_job(client):
    running = repair_job_proto(checked=10, reindexed=2, dropped=1, dropped_ids=["d1"])
    running.errors.add(source_key="x1").status.message = "corrupt image"
    done = repair_job_proto(checked=40, reindexed=3, dropped=1, removed=2, failed=1, dropped_ids=["d1"],
                            state=pb.REPAIR_STATE_SUCCEEDED, dry_run=True)
    client._stub = RecordingStub({"RepairCollection": pb.RepairCollectionResponse(job=running),
                                  "GetRepairJob": pb.GetRepairJobResponse(job=done)})
    job = client.repair(dry_run=True)
    assert isinstance(job, RepairJob) and not job.done
    assert (job.job_id, job.collection, job.state, job.checked, job.reindexed, job.dropped) == \
        ("r1", "pets", "RUNNING", 10, 2, 1)
    assert job.dropped_ids == ["d1"] and job.errors == [("x1", "corrupt image")]
    assert job.create_time == CREATED and job.update_time is None
    final = client.get_repair_job(job.job_id)
    assert final.done and final.state == "SUCCEEDED" and final.dry_run
    assert (final.checked, final.reindexed, final.dropped, final.removed, final.failed) == (40, 3, 1, 2, 1)
    (_, start), (_, get) = client._stub.requests
    assert start == pb.RepairCollectionRequest(collection="pets", dry_run=True)
    assert get == pb.GetRepairJobRequest(job_id="r1")
    client.repair("other")
    assert client._stub.requests[-1][1] == pb.RepairCollectionRequest(collection="other")


def test_repair_calls_are_retried_like_other_idempotent_calls():
    assert {"RepairCollection", "GetRepairJob"} <= set(IDEMPOTENT_METHODS)


def test_delete_collection_reports_pending_shards(client):
    client._stub = RecordingStub({"DeleteCollection": pb.DeleteCollectionResponse(
        pending=True, waiting_for_shards=["index-1.index:50052"])})
    assert client.delete_collection("pets") == CollectionDeletion(True, ["index-1.index:50052"])
    client._stub.responses["DeleteCollection"] = pb.DeleteCollectionResponse()
    assert client.delete_collection("pets") == CollectionDeletion(False, [])


def test_async_client_has_the_same_methods():
    async def use():
        async with AsyncClient("127.0.0.1:1", collection="pets") as client:
            client._stub = RecordingStub({
                "RepairCollection": pb.RepairCollectionResponse(job=repair_job_proto()),
                "DeleteCollection": pb.DeleteCollectionResponse(pending=True, waiting_for_shards=["s1"]),
                "SearchImages": pb.SearchImagesResponse(),
            }, asynchronous=True)
            job = await client.repair()
            deletion = await client.delete_collection("pets")
            await client.search("x", with_metadata=False)
            return job, deletion, client._stub.requests[-1][1]

    job, deletion, search = asyncio.run(use())
    assert job.state == "RUNNING" and deletion.waiting_for_shards == ["s1"]
    assert list(search.read_mask.paths) == ["id", "score", "url"]


# ---------------------------------------------------------------------- CLI


def test_repair_help_and_arguments():
    result = subprocess.run([sys.executable, "-m", "clipsearch.cli", "repair", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--dry-run" in result.stdout and "--collection" in result.stdout
    args = cli.build_parser().parse_args(["repair", "--collection", "pets", "--dry-run", "--target", "gw:50050"])
    assert (args.func, args.collection, args.dry_run, args.target) == (cli.cmd_repair, "pets", True, "gw:50050")
    assert not cli.build_parser().parse_args(["repair"]).dry_run


def job(state="RUNNING", checked=0, **fields) -> RepairJob:
    values = dict(job_id="r1", collection="pets", dry_run=False, state=state, checked=checked, reindexed=0,
                  dropped=0, removed=0, failed=0, dropped_ids=[], errors=[])
    return RepairJob(**{**values, **fields})


class FakeClient:
    """What `clipsearch repair` and `collections delete` use of the SDK, scripted."""

    def __init__(self, jobs=(), deletion=None):
        self.jobs = list(jobs)
        self.deletion = deletion
        self.calls: list[tuple] = []

    def repair(self, collection=None, *, dry_run=False):
        self.calls.append(("repair", dry_run))
        return self.jobs.pop(0)

    def get_repair_job(self, job_id):
        self.calls.append(("get", job_id))
        answer = self.jobs.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def delete_collection(self, name):
        return self.deletion

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.fixture
def fake(monkeypatch):
    def install(**kwargs):
        client = FakeClient(**kwargs)
        monkeypatch.setattr(cli, "make_client", lambda args: client)
        monkeypatch.setattr(cli.time, "sleep", lambda seconds: None)
        return client
    return install


def test_repair_follows_the_job_and_prints_counts(fake, capsys):
    dropped = [f"{i:064x}" for i in range(25)]
    client = fake(jobs=[job(checked=5), job(checked=20), job("SUCCEEDED", 50, reindexed=3, dropped=30, removed=1,
                                                              failed=2, dropped_ids=dropped, errors=[("x", "bad")])])
    assert cli.main(["repair", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert client.calls == [("repair", False), ("get", "r1"), ("get", "r1")]
    assert "checked=50  reindexed=3  dropped=30  removed=1  failed=2" in out
    assert f"dropped: {dropped[0]}" in out and dropped[20] not in out and "and 10 more dropped" in out
    assert "failed: x: bad" in err


def test_repair_exits_1_when_the_job_failed(fake, capsys):
    fake(jobs=[job("FAILED", 7)])
    assert cli.main(["repair", "--quiet", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["state"] == "FAILED" and report["checked"] == 7 and report["dropped_ids"] == []


def test_repair_dry_run_says_nothing_changed(fake, capsys):
    client = fake(jobs=[job("SUCCEEDED", 9, dry_run=True, dropped=1, dropped_ids=["d"])])
    assert cli.main(["repair", "--quiet", "--dry-run"]) == 0
    assert client.calls == [("repair", True)]
    assert "dry run: nothing changed" in capsys.readouterr().out


def test_repair_resumes_when_its_job_is_unknown_to_the_gateway_answering(fake):
    # Several gateway replicas: a poll may reach one that did not start the job.
    client = fake(jobs=[job(checked=1), errors.NotFound("no job r1"), job("RUNNING", 3, job_id="r2"),
                        job("SUCCEEDED", 4, job_id="r2")])
    assert cli.main(["repair", "--quiet"]) == 0
    assert client.calls == [("repair", False), ("get", "r1"), ("repair", False), ("get", "r2")]


@pytest.mark.parametrize("deletion, expected", [
    (CollectionDeletion(False, []), "deleted collection pets\n"),
    (CollectionDeletion(True, ["index-1.index:50052", "index-3.index:50052"]),
     "pending: waiting for shards index-1.index:50052, index-3.index:50052"),
])
def test_collection_deletion_says_when_it_is_pending(fake, capsys, deletion, expected):
    fake(deletion=deletion)
    assert cli.main(["collections", "delete", "pets"]) == 0
    assert expected in capsys.readouterr().out
