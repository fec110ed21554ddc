"""Collections the gateway creates without a spec get the index service's default
(HNSW32) unless ``--default-index-spec`` names another; a spec's HNSW parameters
pass through, and a bad one is refused with the index service's message."""

from __future__ import annotations

import grpc
import pytest

from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from index_service.shards import DEFAULT_INDEX_SPEC
from tests.gateway.conftest import Client, start_gateway


def spec_of(client: Client, name: str) -> str:
    return client.GetCollection(gpb.GetCollectionRequest(name=name)).collection.index_spec


def test_collections_created_without_a_spec_get_the_default(tmp_path, encoder_service, index_shards):
    gateway = start_gateway(tmp_path, encoder_service, index_shards, "--storage", str(tmp_path / "images"),
                            "--default-collection", "defaultspec", name="gateway-default-spec")
    client = Client(gateway.address)
    try:
        assert spec_of(client, "defaultspec") == DEFAULT_INDEX_SPEC  # created at startup
        created = client.CreateCollection(gpb.CreateCollectionRequest(name="defidx-nospec")).collection
        assert created.index_spec == DEFAULT_INDEX_SPEC
        exact = client.CreateCollection(gpb.CreateCollectionRequest(name="defidx-exact", index_spec="Flat"))
        assert exact.collection.index_spec == "Flat"
        tuned = client.CreateCollection(gpb.CreateCollectionRequest(name="defidx-tuned", index_spec="HNSW16,efS=96"))
        assert tuned.collection.index_spec == "HNSW16,efSearch=96"
        with pytest.raises(grpc.RpcError) as error:
            client.CreateCollection(gpb.CreateCollectionRequest(name="defidx-bad", index_spec="HNSW32,efC=-1"))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "efConstruction must be a whole number from 1 to 4096" in error.value.details()
    finally:
        client.close()
        gateway.terminate()


def test_default_index_spec_flag_applies_to_both_ways_of_creating(tmp_path, encoder_service, index_shards):
    gateway = start_gateway(tmp_path, encoder_service, index_shards, "--storage", str(tmp_path / "images"),
                            "--default-collection", "flagspec", "--default-index-spec", "Flat",
                            name="gateway-flag-spec")
    client = Client(gateway.address)
    try:
        assert spec_of(client, "flagspec") == "Flat"
        created = client.CreateCollection(gpb.CreateCollectionRequest(name="defidx-flag-nospec")).collection
        assert created.index_spec == "Flat"
    finally:
        client.close()
        gateway.terminate()
