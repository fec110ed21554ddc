"""The gateway's shape: the engine side imports no proto module and no gRPC,
and the gateway's own modules import each other without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"
# Everything behind the servicer except the clients of the internal services
# (encoder.py, shards.py, rpc.py) and the server plumbing (auth.py, __main__.py).
# access.py holds the scope rules that auth.py applies.
ENGINE_SIDE = ["access", "engine", "collections", "searcher", "search", "ingest", "imports", "repair", "jobs", "validation",
               "types", "deadline", "storage", "settings", "metrics", "admission"]


def imports_of(module: str) -> set[str]:
    tree = ast.parse((GATEWAY / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("module", ENGINE_SIDE)
def test_engine_side_imports_no_proto_and_no_grpc(module):
    wired = sorted(name for name in imports_of(module)
                   if name.split(".")[0] in ("grpc", "grpc_status")
                   or name.startswith(("google.protobuf", "google.rpc"))
                   or name.endswith(("_pb2", "_pb2_grpc")) or "_pb2." in name
                   or name in ("clipsearch.item_status", "clipsearch.status"))
    assert not wired, f"gateway/{module}.py imports {wired}"


def test_gateway_modules_form_no_cycle():
    modules = {path.stem for path in GATEWAY.glob("*.py")}
    graph = {m: {name.split(".")[1] for name in imports_of(m)
                 if name.startswith("gateway.") and name.split(".")[1] in modules} for m in modules}
    done, active = set(), []

    def visit(module):
        if module in active:
            cycle = active[active.index(module):] + [module]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        active.append(module)
        for target in sorted(graph[module]):
            visit(target)
        active.pop()
        done.add(module)

    for module in sorted(modules):
        visit(module)
