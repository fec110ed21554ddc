"""The encoder service through a real server on a loopback port."""

from __future__ import annotations

import asyncio
import io
import signal
import time
import urllib.request

import grpc
import numpy as np
import pytest
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from clipsearch.encoder.v1 import encoder_service_pb2 as pb
from clipsearch.encoder.v1 import encoder_service_pb2_grpc
from clipsearch.vectors import unpack_matrix
from encoder_service.model import load_model
from tests.encoder.conftest import TINY, image_bytes, jpeg_bytes


def metric_value(metrics_port: int, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_texts_and_images_give_unit_vectors_from_the_same_model(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.model_name, info.pretrained, info.dim, info.device, info.dtype) == (
        "clipsearch-tiny", "none", 64, "cpu", "float32")
    texts = stub.EmbedTexts(pb.EmbedTextsRequest(texts=["a red circle", "a blue square"]))
    images = stub.EmbedImages(pb.EmbedImagesRequest(images=[pb.ImageInput(data=jpeg_bytes(1))]))
    assert texts.model_fingerprint == images.model_fingerprint == info.model_fingerprint
    for matrix in (unpack_matrix(texts.embeddings), unpack_matrix(images.embeddings)):
        assert matrix.shape[1] == 64
        np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-3)
    again = stub.EmbedTexts(pb.EmbedTextsRequest(texts=["a red circle", "a blue square"]))
    np.testing.assert_array_equal(unpack_matrix(texts.embeddings), unpack_matrix(again.embeddings))


def test_service_embeddings_equal_the_in_process_model(stub):
    model = load_model("clipsearch-tiny", "none")
    texts = ["a dog playing in snow", "two cats"]
    served = unpack_matrix(stub.EmbedTexts(pb.EmbedTextsRequest(texts=texts)).embeddings)
    np.testing.assert_allclose(served, model.encode_texts(texts), atol=1e-5)
    image = Image.open(io.BytesIO(jpeg_bytes(7)))
    served_image = unpack_matrix(stub.EmbedImages(pb.EmbedImagesRequest(
        images=[pb.ImageInput(data=jpeg_bytes(7))])).embeddings)
    np.testing.assert_allclose(served_image, model.encode_images([image.convert("RGB")]), atol=1e-4)


def test_concurrent_single_item_calls_are_batched_and_each_caller_gets_its_own_vector(encoder):
    texts = [f"caption number {i} about shapes" for i in range(24)]
    model = load_model("clipsearch-tiny", "none")
    expected = model.encode_texts(texts)
    calls_before = metric_value(encoder.metrics_port, "clipsearch_encoder_model_calls_total", kind="text")

    async def fire():
        async with grpc.aio.insecure_channel(encoder.address) as channel:
            aio_stub = encoder_service_pb2_grpc.EncoderServiceStub(channel)
            return await asyncio.gather(*(aio_stub.EmbedTexts(pb.EmbedTextsRequest(texts=[t])) for t in texts))

    responses = asyncio.run(fire())
    calls = metric_value(encoder.metrics_port, "clipsearch_encoder_model_calls_total", kind="text") - calls_before
    assert 1 <= calls < len(texts), f"{len(texts)} concurrent calls made {calls} model calls"
    for response, want in zip(responses, expected):
        np.testing.assert_allclose(unpack_matrix(response.embeddings)[0], want, atol=1e-5)


def bad_images() -> dict[str, bytes]:
    good_png = image_bytes(Image.new("RGB", (64, 64), (10, 200, 30)), "PNG")
    bomb = image_bytes(Image.new("L", (3000, 3000)), "PNG", optimize=True)  # 9 Mpx, tiny file
    return {
        "corrupt": b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20,
        "truncated": jpeg_bytes(3)[:300],
        "zero-byte": b"",
        "bomb": bomb,
        "not-an-image": good_png[:8] + b"garbage" * 10,
    }


def test_bad_images_fail_alone_in_the_middle_of_a_good_batch(stub):
    bad = bad_images()
    assert len(bad["bomb"]) < 100_000
    items = [pb.ImageInput(data=jpeg_bytes(10))]
    for data in bad.values():
        items.append(pb.ImageInput(data=data))
    items.append(pb.ImageInput(data=jpeg_bytes(11)))
    response = stub.EmbedImages(pb.EmbedImagesRequest(images=items))
    codes = [s.code for s in response.statuses]
    assert codes == [code_pb2.OK] + [code_pb2.INVALID_ARGUMENT] * len(bad) + [code_pb2.OK]
    messages = dict(zip(bad, [s.message for s in response.statuses[1:-1]]))
    assert "corrupt" in messages["truncated"] or "truncated" in messages["truncated"]
    assert "0 bytes" in messages["zero-byte"]
    assert "pixels" in messages["bomb"]
    matrix = unpack_matrix(response.embeddings)
    np.testing.assert_allclose(np.linalg.norm(matrix[[0, -1]], axis=1), 1.0, atol=1e-3)
    assert not matrix[1:-1].any(), "failed items get zero rows"


def test_every_accepted_format_decodes_with_exif_and_alpha_handled(stub):
    rgba = Image.new("RGBA", (80, 60), (255, 0, 0, 0))
    exif_image = Image.new("RGB", (80, 40), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    formats = [
        image_bytes(Image.new("RGB", (70, 50), (1, 2, 3)), "JPEG"),
        image_bytes(rgba, "PNG"),
        image_bytes(Image.new("RGB", (70, 50), (200, 2, 3)), "WEBP"),
        image_bytes(Image.new("RGB", (70, 50), (1, 200, 3)), "BMP"),
        image_bytes(Image.new("P", (70, 50)), "GIF"),
        image_bytes(exif_image, "JPEG", exif=exif),
    ]
    response = stub.EmbedImages(pb.EmbedImagesRequest(images=[pb.ImageInput(data=d) for d in formats]))
    assert [s.code for s in response.statuses] == [code_pb2.OK] * len(formats), response.statuses
    # Fully transparent red over white is white, the same as a white image.
    white = image_bytes(Image.new("RGB", (80, 60), (255, 255, 255)), "PNG")
    pair = stub.EmbedImages(pb.EmbedImagesRequest(images=[pb.ImageInput(data=formats[1]), pb.ImageInput(data=white)]))
    rows = unpack_matrix(pair.embeddings)
    np.testing.assert_allclose(rows[0], rows[1], atol=1e-5)


def test_images_are_read_from_s3_uris(stub, s3_bucket):
    client, bucket = s3_bucket
    data = jpeg_bytes(21)
    client.put_object(Bucket=bucket, Key="photos/a.jpg", Body=data)
    response = stub.EmbedImages(pb.EmbedImagesRequest(images=[
        pb.ImageInput(uri=f"s3://{bucket}/photos/a.jpg"),
        pb.ImageInput(data=data),
        pb.ImageInput(uri=f"s3://{bucket}/photos/missing.jpg"),
        pb.ImageInput(uri="s3://no-such-bucket-xyz/a.jpg"),
        pb.ImageInput(uri="http://example.invalid/a.jpg"),
    ]))
    codes = [s.code for s in response.statuses]
    assert codes == [code_pb2.OK, code_pb2.OK, code_pb2.NOT_FOUND, code_pb2.NOT_FOUND, code_pb2.INVALID_ARGUMENT]
    rows = unpack_matrix(response.embeddings)
    np.testing.assert_allclose(rows[0], rows[1], atol=1e-6)


@pytest.mark.parametrize(
    "request_, fragment",
    [
        (pb.EmbedTextsRequest(texts=[]), "no texts"),
        (pb.EmbedTextsRequest(texts=["a"] * 65), "limit is 64"),
        (pb.EmbedTextsRequest(texts=["ok", "x" * 301]), "texts[1] has 301 characters"),
        (pb.EmbedTextsRequest(texts=["ok", "   "]), "texts[1] is empty"),
    ],
)
def test_bad_text_requests_are_invalid_argument_and_the_service_stays_up(stub, request_, fragment):
    with pytest.raises(grpc.RpcError) as info:
        stub.EmbedTexts(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()
    assert stub.EmbedTexts(pb.EmbedTextsRequest(texts=["still up"])).embeddings.rows == 1


def test_empty_and_oversized_image_batches_are_invalid_argument(stub):
    for request_ in (pb.EmbedImagesRequest(), pb.EmbedImagesRequest(images=[pb.ImageInput(data=b"x")] * 65)):
        with pytest.raises(grpc.RpcError) as info:
            stub.EmbedImages(request_)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_non_utf8_text_is_invalid_argument_not_internal(encoder):
    channel = grpc.insecure_channel(encoder.address)
    raw_call = channel.unary_unary(
        "/clipsearch.encoder.v1.EncoderService/EmbedTexts",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    bad = b"\x0a\x03\xff\xfe\xfd"  # field 1 (texts), 3 bytes that are not UTF-8
    with pytest.raises(grpc.RpcError) as info:
        raw_call(bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in info.value.details()
    channel.close()


def test_metrics_count_calls_by_grpc_code(encoder, stub):
    before_ok = metric_value(encoder.metrics_port, "grpc_server_handled_total", grpc_method="EmbedTexts", grpc_code="OK")
    before_bad = metric_value(encoder.metrics_port, "grpc_server_handled_total", grpc_method="EmbedTexts",
                              grpc_code="INVALID_ARGUMENT")
    stub.EmbedTexts(pb.EmbedTextsRequest(texts=["fine"]))
    with pytest.raises(grpc.RpcError):
        stub.EmbedTexts(pb.EmbedTextsRequest())
    assert metric_value(encoder.metrics_port, "grpc_server_handled_total", grpc_method="EmbedTexts",
                        grpc_code="OK") == before_ok + 1
    assert metric_value(encoder.metrics_port, "grpc_server_handled_total", grpc_method="EmbedTexts",
                        grpc_code="INVALID_ARGUMENT") == before_bad + 1
    assert metric_value(encoder.metrics_port, "grpc_server_handling_seconds_count", grpc_method="EmbedTexts") > 0
    assert metric_value(encoder.metrics_port, "clipsearch_encoder_batch_size_count", kind="text") > 0


def test_reflection_lists_the_services(encoder):
    channel = grpc.insecure_channel(encoder.address)
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"clipsearch.encoder.v1.EncoderService", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= services
    channel.close()


def test_health_goes_not_serving_then_serving_then_not_serving_on_sigterm(service_process, tmp_path):
    from tests.conftest import ServiceProcess

    proc = ServiceProcess("encoder_service", [*TINY, "--port", "0", "--drain-delay-seconds", "3"], tmp_path,
                          name="health-encoder")
    # Watch health from the moment the port is bound: it must be NOT_SERVING while the model loads.
    proc.start()
    channel = grpc.insecure_channel(proc.address)
    health = health_pb2_grpc.HealthStub(channel)
    service_name = "clipsearch.encoder.v1.EncoderService"
    assert health.Check(health_pb2.HealthCheckRequest(service=service_name)).status == health_pb2.HealthCheckResponse.SERVING
    proc.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 3
    status = None
    while time.monotonic() < deadline:
        status = health.Check(health_pb2.HealthCheckRequest(service=service_name)).status
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        time.sleep(0.05)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert proc.proc.wait(30) == 0
    channel.close()
