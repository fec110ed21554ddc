"""Shared service plumbing: settings precedence, health lifecycle, drain, errors."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from google.rpc import error_details_pb2

from clipsearch.encoder.v1 import encoder_service_pb2 as pb
from clipsearch.encoder.v1 import encoder_service_pb2_grpc
from clipsearch.errors import InvalidArgument
from clipsearch.server.app import GrpcService, Registration, run_until_signalled
from clipsearch.server.settings import ServerSettings, SettingsError, load_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclasses.dataclass
class DemoSettings(ServerSettings):
    model: str = dataclasses.field(default="default-model", metadata={"help": "a model"})
    batch: int = 8
    tags: list[str] = dataclasses.field(default_factory=list)


def test_settings_precedence_is_defaults_then_yaml_then_env_then_flags(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("model: from-yaml\nbatch: 16\nport: 1111\nencoder:\n  batch: 32\n  tags: [a, b]\n")
    settings = load_settings(DemoSettings, section="encoder", argv=["--config", str(config)], environ={})
    assert (settings.model, settings.batch, settings.port, settings.tags) == ("from-yaml", 32, 1111, ["a", "b"])
    env = {"CLIPSEARCH_MODEL": "from-env", "CLIPSEARCH_PORT": "2222", "CLIPSEARCH_LOG_JSON": "true"}
    settings = load_settings(DemoSettings, section="encoder", argv=["--config", str(config)], environ=env)
    assert (settings.model, settings.port, settings.log_json) == ("from-env", 2222, True)
    settings = load_settings(DemoSettings, section="encoder",
                             argv=["--config", str(config), "--model", "from-flag", "--no-log-json"], environ=env)
    assert (settings.model, settings.port, settings.batch, settings.log_json) == ("from-flag", 2222, 32, False)
    assert load_settings(DemoSettings, section="index", argv=[], environ={}).model == "default-model"


def test_bad_settings_say_what_to_fix(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("modle: typo\n")
    with pytest.raises(SettingsError, match="unknown settings.*modle.*valid names"):
        load_settings(DemoSettings, section="encoder", argv=["--config", str(config)], environ={})
    with pytest.raises(SettingsError, match="batch: expected int"):
        load_settings(DemoSettings, section="encoder", argv=["--batch", "many"], environ={})
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(DemoSettings, section="encoder", argv=["--config", str(tmp_path / "nope.yaml")], environ={})


class SlowServicer(encoder_service_pb2_grpc.EncoderServiceServicer):
    def __init__(self):
        self.release = asyncio.Event()

    async def EmbedTexts(self, request, context):
        if request.texts and request.texts[0] == "peer":
            return pb.EmbedTextsResponse(model_fingerprint=context.peer())
        if request.texts and request.texts[0] == "slow":
            await self.release.wait()
            return pb.EmbedTextsResponse(model_fingerprint="done")
        raise InvalidArgument("texts[0] is not acceptable here", field="texts[0]", reason="DEMO")


async def _lifecycle():
    settings = ServerSettings(port=0, grace_seconds=5, drain_delay_seconds=0.5)
    servicer = SlowServicer()
    service = GrpcService(settings, [Registration(
        pb.DESCRIPTOR.services_by_name["EncoderService"],
        encoder_service_pb2_grpc.add_EncoderServiceServicer_to_server,
        servicer)], name="demo")
    loaded, stop = asyncio.Event(), asyncio.Event()

    async def load():
        await loaded.wait()

    async def shutdown():
        pass

    runner = asyncio.create_task(run_until_signalled(service, load=load, shutdown=shutdown, stop_event=stop))
    while service.port is None:
        await asyncio.sleep(0.01)
    async with grpc.aio.insecure_channel(service.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = encoder_service_pb2_grpc.EncoderServiceStub(channel)
        seen = [(await health.Check(health_pb2.HealthCheckRequest())).status]
        loaded.set()
        while (await health.Check(health_pb2.HealthCheckRequest())).status != SERVING:
            await asyncio.sleep(0.01)
        seen.append(SERVING)

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.EmbedTexts(pb.EmbedTextsRequest(texts=["bad"]))
        status = rpc_status.from_call(info.value)
        violation = error_details_pb2.BadRequest()
        status.details[0].Unpack(violation)

        in_flight = asyncio.ensure_future(stub.EmbedTexts(pb.EmbedTextsRequest(texts=["slow"])))
        await asyncio.sleep(0.1)
        stop.set()
        await asyncio.sleep(0.1)
        seen.append((await health.Check(health_pb2.HealthCheckRequest())).status)
        servicer.release.set()
        finished = await in_flight
    await runner
    return seen, info.value, violation, finished


def test_health_lifecycle_rich_errors_and_drain_of_in_flight_calls():
    seen, error, violation, finished = asyncio.run(_lifecycle())
    assert seen == [NOT_SERVING, SERVING, NOT_SERVING]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "texts[0] is not acceptable here"
    assert violation.field_violations[0].field == "texts[0]"
    assert finished.model_fingerprint == "done", "the in-flight call finished during the drain"


@dataclasses.dataclass
class GatewayLike(ServerSettings):
    encoder: str = "127.0.0.1:50051"


def test_a_top_level_setting_named_like_a_section_is_still_a_setting(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("encoder: enc:50051\nindex:\n  port: 9\ngateway:\n  port: 7\n")
    settings = load_settings(GatewayLike, section="gateway", argv=["--config", str(config)], environ={})
    assert (settings.encoder, settings.port) == ("enc:50051", 7)


async def _peers_over_time(seconds: float) -> list[str]:
    settings = ServerSettings(port=0, max_connection_age_seconds=0.3, grace_seconds=1)
    service = GrpcService(settings, [Registration(
        pb.DESCRIPTOR.services_by_name["EncoderService"],
        encoder_service_pb2_grpc.add_EncoderServiceServicer_to_server,
        SlowServicer())], name="aging")
    await service.start()
    peers = []
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = encoder_service_pb2_grpc.EncoderServiceStub(channel)
            deadline = asyncio.get_running_loop().time() + seconds
            while asyncio.get_running_loop().time() < deadline:
                peers.append((await stub.EmbedTexts(pb.EmbedTextsRequest(texts=["peer"]))).model_fingerprint)
                await asyncio.sleep(0.05)
    finally:
        await service.stop(grace=0)
    return peers


def test_connections_are_recycled_after_max_age_without_failing_calls():
    peers = asyncio.run(_peers_over_time(1.5))
    assert len(peers) > 10, "every call succeeded across connection recycling"
    assert len(set(peers)) >= 2, f"the client reconnected (new peer ports): {sorted(set(peers))}"
