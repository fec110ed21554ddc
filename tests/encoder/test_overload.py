"""Overload smoke test on a real encoder process: a burst past the byte budget is
refused at once with a retry hint, work whose deadline passes in the queue is
dropped before the model call, and the service stays up. No timings are asserted
(they live in bench/overload.py)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipsearch.admission import BUDGET_EXHAUSTED, DEADLINE_UNMEETABLE
from clipsearch.encoder.v1 import encoder_service_pb2 as pb
from clipsearch.encoder.v1 import encoder_service_pb2_grpc
from clipsearch.status import RETRY_AFTER_TRAILER, error_from_rpc
from tests.encoder.conftest import TINY, jpeg_bytes
from tests.encoder.test_service import metric_value

QUEUE_DELAY_MS = 300  # every request's items wait this long for company: its cost stays in flight meanwhile


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """An encoder whose budget (1 MiB) holds one 16-image request of the tiny model at a time."""
    from tests.conftest import ServiceProcess

    proc = ServiceProcess(
        "encoder_service",
        [*TINY, "--port", "0", "--metrics-port", "0", "--max-in-flight-mb", "1",
         "--max-queue-delay-ms", str(QUEUE_DELAY_MS), "--max-batch-size", "256", "--drain-delay-seconds", "0"],
        tmp_path_factory.mktemp("overload"), name="encoder-overload",
    ).start()
    yield proc
    proc.terminate()


def images_request(seed: int, count: int = 16) -> pb.EmbedImagesRequest:
    return pb.EmbedImagesRequest(images=[pb.ImageInput(data=jpeg_bytes(seed * 100 + i)) for i in range(count)])


def test_a_burst_past_the_budget_is_refused_at_once_with_a_retry_hint(encoder):
    requests = [images_request(seed) for seed in range(12)]
    refused_before = metric_value(encoder.metrics_port, "clipsearch_admission_rejected_total", service="encoder",
                                  kind="image", reason=BUDGET_EXHAUSTED)

    async def burst():
        finished = []
        async with grpc.aio.insecure_channel(encoder.address) as channel:
            stub = encoder_service_pb2_grpc.EncoderServiceStub(channel)

            async def one(request):
                call = stub.EmbedImages(request, timeout=60)
                try:
                    await call
                    finished.append(("ok", None, None))
                except grpc.aio.AioRpcError as error:
                    finished.append((error.code(), error, dict(await call.trailing_metadata())))

            await asyncio.gather(*(one(r) for r in requests))
        return finished

    finished = asyncio.run(burst())
    refused = [(error, trailers) for code, error, trailers in finished if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert refused and any(code == "ok" for code, _, _ in finished), finished
    assert {code for code, _, _ in finished} <= {"ok", grpc.StatusCode.RESOURCE_EXHAUSTED}
    # Refusals do not wait behind the admitted work: the first answer back is one.
    assert finished[0][0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    for error, trailers in refused:
        rich = error_from_rpc(error)
        assert rich.reason == BUDGET_EXHAUSTED and rich.retry_after is not None and rich.retry_after > 0
        assert int(trailers[RETRY_AFTER_TRAILER]) > 0
    refused_now = metric_value(encoder.metrics_port, "clipsearch_admission_rejected_total", service="encoder",
                               kind="image", reason=BUDGET_EXHAUSTED)
    assert refused_now - refused_before == len(refused)


def test_work_that_cannot_meet_its_deadline_is_refused_or_dropped_before_the_model_call(encoder):
    """Refused at admission when the measured time per text already says it cannot finish
    in time; otherwise dropped from the queue once its deadline passes. Never computed."""
    stub = encoder_service_pb2_grpc.EncoderServiceStub(grpc.insecure_channel(encoder.address))
    stub.EmbedTexts(pb.EmbedTextsRequest(texts=["warm up"]), timeout=60)

    def counts() -> tuple[float, float, float]:
        port = encoder.metrics_port
        return (metric_value(port, "clipsearch_encoder_model_calls_total", kind="text"),
                metric_value(port, "clipsearch_admission_dropped_total", service="encoder", kind="text"),
                metric_value(port, "clipsearch_admission_rejected_total", service="encoder", kind="text",
                             reason=DEADLINE_UNMEETABLE))

    calls_before, dropped_before, refused_before = counts()
    with pytest.raises(grpc.RpcError) as caught:  # would wait QUEUE_DELAY_MS in the queue: far past its deadline
        stub.EmbedTexts(pb.EmbedTextsRequest(texts=["too late", "also too late"]), timeout=QUEUE_DELAY_MS / 10000)
    if caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert error_from_rpc(caught.value).reason == DEADLINE_UNMEETABLE
        assert counts()[2] == refused_before + 1
    else:
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(100):  # the queue delay runs out after the client gave up
            if counts()[1] > dropped_before:
                break
            time.sleep(0.05)
        assert counts()[1] == dropped_before + 2
    assert counts()[0] == calls_before


def test_the_service_stays_up_and_serves_after_overload(encoder):
    channel = grpc.insecure_channel(encoder.address)
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stub = encoder_service_pb2_grpc.EncoderServiceStub(channel)
    assert stub.EmbedImages(images_request(99), timeout=60).embeddings.rows == 16
    assert len(stub.EmbedTexts(pb.EmbedTextsRequest(texts=["a red circle"]), timeout=60).embeddings.data) > 0
    channel.close()
