"""One of two index shards killed: the 'fail' policy answers UNAVAILABLE naming
it, the 'partial' policy answers from the other shard with partial=true. Both
answer within the caller's deadline."""

from __future__ import annotations

import grpc
import pytest

from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from gateway.shards import shard_for_id
from tests.gateway.conftest import Client, noise_image, sha, start_gateway, start_index_shards


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, encoder_service):
    workdir = tmp_path_factory.mktemp("gw-shards")
    shards = start_index_shards(workdir, prefix="doomed")
    common = ["--storage", str(workdir / "images"), "--default-collection", "doomed", "--index-timeout-seconds", "3"]
    fail = start_gateway(workdir, encoder_service, shards, *common, "--shard-failure-policy", "fail",
                         name="gateway-fail")
    partial = start_gateway(workdir, encoder_service, shards, *common, "--shard-failure-policy", "partial",
                            name="gateway-partial")
    yield workdir, shards, fail, partial
    for proc in (fail, partial, *shards):
        proc.terminate()


def test_shard_failure_policies(cluster):
    workdir, shards, fail, partial = cluster
    datas = [noise_image(800 + i) for i in range(16)]
    fail_client, partial_client = Client(fail.address), Client(partial.address)
    assert all(r.status.code == 0 for r in fail_client.upload(datas))
    query = gpb.QueryPart(image_data=datas[0])
    assert len(partial_client.search(query, top_k=16).hits) == 16

    shards[1].kill()
    survivors = {sha(d) for d in datas if shard_for_id(sha(d), 2) == 0}
    assert 0 < len(survivors) < 16

    with pytest.raises(grpc.RpcError) as err:
        fail_client.search(query, top_k=16, timeout=10)  # the gateway must answer before this deadline
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shard-1" in err.value.details() and shards[1].address not in err.value.details()

    response = partial_client.search(query, top_k=16, timeout=10)
    assert response.partial and list(response.missing_shards) == ["shard-1"]
    assert {h.id for h in response.hits} == survivors

    # Writes to the dead shard fail per item; the others go through.
    fresh = [noise_image(850 + i) for i in range(8)]
    results = partial_client.upload(fresh, timeout=10)
    for data, result in zip(fresh, results):
        dead = shard_for_id(sha(data), 2) == 1
        assert (result.status.code == grpc.StatusCode.UNAVAILABLE.value[0]) == dead
        assert (workdir / "images" / "doomed" / f"{sha(data)}.png").exists() == (not dead)
    fail_client.close()
    partial_client.close()
