"""The HTTP/JSON API against a real gateway (subprocess, --http-port 0) over the real
encoder and index shards: routes from google.api.http, proto3 JSON bodies, multipart and
base64 images, Bearer keys with the gRPC scopes, errors as google.rpc.Status JSON, the
image content route, the OpenAPI document and the page."""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest

from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from clipsearch.keys import key_entry, keys_file_text, new_secret
from tests.gateway.conftest import noise_image, sha, start_gateway

COLLECTION = "http-images"
SECRETS = {"admin": new_secret(), "reader": new_secret(), "writer": new_secret()}
SCOPES = {"admin": ["admin:*"], "reader": ["read:*"], "writer": [f"write:{COLLECTION}", f"read:{COLLECTION}"]}
IMAGES = f"/v1/collections/{COLLECTION}/images"


@pytest.fixture(scope="module")
def http(tmp_path_factory, encoder_service, index_shards):
    workdir = tmp_path_factory.mktemp("gw-http")
    keys = workdir / "keys.yaml"
    keys.write_text(keys_file_text([key_entry(k, SECRETS[k], SCOPES[k], [str(workdir / "imports")] if k == "admin"
                                              else []) for k in SECRETS]))
    (workdir / "imports").mkdir()
    for i in range(3):
        (workdir / "imports" / f"imported-{i}.png").write_bytes(noise_image(900 + i))
    proc = start_gateway(workdir, encoder_service, index_shards, "--storage", str(workdir / "images"),
                         "--default-collection", COLLECTION, "--api-keys-file", str(keys), "--http-port", "0",
                         "--import-sources", str(workdir / "imports"), name="gateway-http")
    assert proc.http_port
    with httpx.Client(base_url=f"http://127.0.0.1:{proc.http_port}", timeout=30) as client:
        client.workdir = workdir
        yield client
    proc.terminate()


def auth(who: str) -> dict:
    return {"authorization": f"Bearer {SECRETS[who]}"}


def text_search(client, text: str, who: str = "reader", **fields) -> dict:
    response = client.post(f"{IMAGES}:search", json={"parts": [{"text": text}], **fields}, headers=auth(who))
    assert response.status_code == 200, response.text
    return response.json()


def status_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) <= {"code", "message", "details"} and body["message"], body
    assert response.headers["x-request-id"]
    return body


def test_upload_multipart_and_base64_json_then_search_get_list_and_content(http):
    images = [noise_image(i) for i in range(4)]
    request = {"items": [{"metadata": {"fields": {"kind": {"stringValue": "noise"}, "n": {"numberValue": i}}}}
                         for i in range(3)]}
    response = http.post(f"{IMAGES}:upload", headers=auth("writer"), data={"request": json.dumps(request)},
                         files=[("items", (f"noise-{i}.png", images[i], "image/png")) for i in range(3)])
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["id"] for r in results] == [sha(d) for d in images[:3]]
    assert all(r["created"] and "code" not in r["status"] for r in results)

    # Base64 bytes in JSON (the proto3 mapping of a bytes field); the same bytes again are no new image.
    response = http.post(f"{IMAGES}:upload", headers=auth("writer"), json={"items": [
        {"data": base64.b64encode(images[3]).decode()}, {"data": base64.b64encode(images[0]).decode()}]})
    assert [r.get("created", False) for r in response.json()["results"]] == [True, False]

    found = text_search(http, "noise", topK=4, minScore=-1)
    assert len(found["hits"]) == 4
    hit = found["hits"][0]
    assert hit["url"] == f"{http.base_url}{IMAGES}/{hit['id']}:content"
    content = http.get(hit["url"], headers=auth("reader"))
    assert content.status_code == 200 and content.headers["content-type"] == "image/png"
    assert sha(content.content) == hit["id"]
    assert http.get(hit["url"]).status_code == 401

    # Filters, image query (multipart file into parts[0]) and relevance feedback.
    filtered = http.post(f"{IMAGES}:search", headers=auth("reader"), json={
        "parts": [{"text": "noise"}], "filter": {"conditions": [{"key": "n", "equals": {"numberValue": 1}}]}})
    assert [h["id"] for h in filtered.json()["hits"]] == [sha(images[1])]
    by_image = http.post(f"{IMAGES}:search", headers=auth("reader"), data={"request": json.dumps({"topK": 1})},
                         files=[("parts", ("q.png", images[2], "image/png"))])
    assert by_image.json()["hits"][0]["id"] == sha(images[2])
    feedback = text_search(http, "noise", topK=4, feedback={"positiveIds": [sha(images[3])]})
    assert len(feedback["hits"]) == 4

    got = http.get(f"{IMAGES}/{sha(images[1])}", headers=auth("reader")).json()["image"]
    assert got["metadata"]["fields"]["kind"] == {"stringValue": "noise"}
    assert got["contentType"] == "image/png" and got["sizeBytes"] == str(len(images[1]))
    page = http.get(IMAGES, params={"pageSize": 3}, headers=auth("reader")).json()
    assert len(page["images"]) == 3 and page["nextPageToken"]
    rest = http.get(IMAGES, params={"pageSize": 3, "pageToken": page["nextPageToken"]}, headers=auth("reader"))
    assert len(rest.json()["images"]) == 1


def test_delete_import_and_collections(http):
    data = noise_image(77)
    http.post(f"{IMAGES}:upload", headers=auth("writer"), json={"items": [{"data": base64.b64encode(data).decode()}]})
    assert http.delete(f"{IMAGES}/{sha(data)}", headers=auth("writer")).json() == {}
    missing = http.get(f"{IMAGES}/{sha(data)}", headers=auth("reader"))
    assert missing.status_code == 404 and status_of(missing)["code"] == 5

    job = http.post(f"{IMAGES}:import", headers=auth("admin"),
                    json={"source": str(http.workdir / "imports")}).json()["job"]
    deadline = time.monotonic() + 60
    while job["state"] == "IMPORT_STATE_RUNNING" and time.monotonic() < deadline:
        time.sleep(0.1)
        job = http.get(f"/v1/importJobs/{job['jobId']}", headers=auth("reader")).json()["job"]
    assert job["state"] == "IMPORT_STATE_SUCCEEDED" and job["imported"] == "3", job

    created = http.post("/v1/collections", headers=auth("admin"), json={"name": "http-extra"})
    assert created.status_code == 200 and created.json()["collection"]["name"] == "http-extra"
    assert http.get("/v1/collections/http-extra", headers=auth("reader")).json()["collection"]["dim"] > 0
    names = [c["name"] for c in http.get("/v1/collections", headers=auth("reader")).json()["collections"]]
    assert {COLLECTION, "http-extra"} <= set(names)
    assert http.delete("/v1/collections/http-extra", headers=auth("admin")).status_code == 200
    assert http.get("/v1/collections/http-extra", headers=auth("reader")).status_code == 404


def test_errors_are_http_statuses_with_google_rpc_status_bodies(http):
    missing = http.post(f"{IMAGES}:search", json={"parts": [{"text": "x"}]})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert status_of(missing)["code"] == 16
    wrong = http.post(f"{IMAGES}:search", json={"parts": [{"text": "x"}]}, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    denied = http.post(f"{IMAGES}:upload", headers=auth("reader"), json={"items": []})
    assert denied.status_code == 403 and "write" in status_of(denied)["message"]
    other = http.get("/v1/collections/someone-else/images", headers=auth("writer"))
    assert other.status_code == 403

    bad_json = http.post(f"{IMAGES}:search", headers=auth("reader"), content=b"{not json")
    assert bad_json.status_code == 400 and status_of(bad_json)["code"] == 3
    unknown_field = http.post(f"{IMAGES}:search", headers=auth("reader"), json={"parts": [], "nope": 1})
    assert unknown_field.status_code == 400
    bad_value = http.post(f"{IMAGES}:search", headers=auth("reader"),
                          json={"parts": [{"text": "x"}], "diversity": 7})
    body = status_of(bad_value)
    assert bad_value.status_code == 400 and body["code"] == 3
    violation = next(d for d in body["details"] if d["@type"].endswith("google.rpc.BadRequest"))
    assert violation["fieldViolations"][0]["field"] == "diversity"
    assert http.get(IMAGES, params={"nope": 1}, headers=auth("reader")).status_code == 400
    broken = http.post(f"{IMAGES}:upload", headers={**auth("writer"), "content-type": "multipart/form-data"},
                       content=b"--x\r\nnot a part")
    assert broken.status_code == 400 and status_of(broken)["code"] == 3
    stray = http.post(f"{IMAGES}:upload", headers=auth("writer"), files=[("nope", ("a.png", b"x", "image/png"))])
    assert stray.status_code == 400 and "nope" in status_of(stray)["message"]
    assert http.get(IMAGES, headers={**auth("reader"), "x-request-timeout": "-1"}).status_code == 400
    assert http.get(f"{IMAGES}/{'0' * 64}", headers={**auth("reader"), "x-request-id": "rid-1"}).headers[
        "x-request-id"] == "rid-1"


def test_openapi_document_and_page(http):
    document = http.get("/openapi.json").json()
    service = gpb.DESCRIPTOR.services_by_name["GatewayService"]
    operations = {op["operationId"] for path in document["paths"].values() for op in path.values()}
    assert {m.name for m in service.methods} <= operations
    search = document["paths"]["/v1/collections/{collection}/images:search"]["post"]
    assert set(search["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert "topK" in document["components"]["schemas"]["clipsearch.gateway.v1.SearchImagesRequest"]["properties"]
    page = http.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert f'<meta name="default-collection" content="{COLLECTION}">' in page.text
    assert http.get("/web/app.js").status_code == 200


def test_body_limit_stops_a_chunked_body_past_the_limit():
    import asyncio

    from clipsearch.errors import ResourceExhausted
    from gateway.http_api import BodyLimit

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass

    chunks = [{"type": "http.request", "body": b"x" * 6, "more_body": i < 2} for i in range(3)]

    async def receive():
        return chunks.pop(0)

    asyncio.run(BodyLimit(app, 20)({"type": "http"}, receive, None))  # 18 bytes: fine
    chunks[:] = [{"type": "http.request", "body": b"x" * 6, "more_body": True} for _ in range(4)]
    with pytest.raises(ResourceExhausted):
        asyncio.run(BodyLimit(app, 20)({"type": "http"}, receive, None))
