"""The checked-in stubs are exactly what the one generation command produces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STUBS = REPO / "clients" / "python"


def generated_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and (p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")))
    }


def test_checked_in_stubs_match_a_fresh_generation(tmp_path):
    protos = sorted(str(p.relative_to(REPO / "protos")) for p in (REPO / "protos").rglob("*.proto"))
    from google.api import annotations_pb2  # googleapis-common-protos ships google/api/*.proto beside it

    googleapis = Path(annotations_pb2.__file__).parents[2]
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", f"-I{googleapis}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos],
        cwd=REPO, check=True,
    )
    fresh = generated_files(tmp_path)
    checked_in = {k: v for k, v in generated_files(STUBS).items() if k.startswith("clipsearch/")}
    assert fresh, "protoc generated nothing"
    assert sorted(fresh) == sorted(checked_in), "stub files differ from the protos: run `make proto`"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale stubs {stale}: run `make proto`"


def test_stubs_import_by_their_proto_package():
    from clipsearch.common.v1 import common_pb2
    from clipsearch.encoder.v1 import encoder_service_pb2_grpc
    from clipsearch.gateway.v1 import gateway_service_pb2
    from clipsearch.index.v1 import index_service_pb2

    assert common_pb2.DESCRIPTOR.package == "clipsearch.common.v1"
    assert index_service_pb2.DESCRIPTOR.services_by_name["IndexService"]
    assert gateway_service_pb2.DESCRIPTOR.services_by_name["GatewayService"]
    assert encoder_service_pb2_grpc.EncoderServiceStub
