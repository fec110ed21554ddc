"""Fault injection for gateway tests with real processes.

- ``S3Proxy``: a TCP proxy in front of the moto S3 server whose mode can be
  switched at any time between ``pass`` (relay bytes), ``hang`` (accept and hold
  connections, relay nothing) and ``stop`` (refuse connections, drop open ones).
  It records the request lines it relays.
- ``Shard``: an index shard process that can be killed, frozen (SIGSTOP) and
  restarted on the same port and data dir.
- ``check_invariant``: every id in the index has its stored object.
- ``wait_repair``: runs RepairCollection to the end.
"""

from __future__ import annotations

import contextlib
import re
import select
import signal
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import grpc

from clipsearch.gateway.v1 import gateway_service_pb2 as gpb
from clipsearch.index.v1 import index_service_pb2 as ipb
from clipsearch.index.v1 import index_service_pb2_grpc
from tests.conftest import ServiceProcess

PASS, HANG, STOP = "pass", "hang", "stop"
IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")
REQUEST_LINE = re.compile(rb"^(?:GET|HEAD|PUT|POST|DELETE) \S+ HTTP/1\.[01]", re.M)


# ---------------------------------------------------------------- S3 proxy


class S3Proxy:
    """A TCP proxy on 127.0.0.1 (port chosen by the OS, kept for its lifetime) in front of ``upstream_url``."""

    POLL = 0.05

    def __init__(self, upstream_url: str):
        parsed = urlparse(upstream_url)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._mode = PASS
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.port = 0
        self.accepted = 0
        # Request lines ("GET /bucket/key?... HTTP/1.1") the clients sent, in order.
        self.requests: list[str] = []

    # -- lifecycle

    def start(self) -> "S3Proxy":
        self._listen()
        self._spawn(self._accept_loop, "s3proxy-accept")
        return self

    def stop(self) -> None:
        """Stops the proxy: closes every socket and joins every thread."""
        self._closed.set()
        with self._changed:
            self._changed.notify_all()
        self._close_listener()
        self._drop_connections()
        for thread in list(self._threads):
            thread.join(5)
        leaked = self.live_threads()
        assert not leaked, f"S3 proxy threads still running: {leaked}"

    def live_threads(self) -> list[str]:
        with self._lock:
            return [t.name for t in self._threads if t.is_alive()]

    def __enter__(self) -> "S3Proxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- modes

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str) -> None:
        if mode not in (PASS, HANG, STOP):
            raise ValueError(f"mode must be one of {PASS!r}, {HANG!r}, {STOP!r}; got {mode!r}")
        with self._changed:
            self._mode = mode
            self._changed.notify_all()
        if mode == STOP:
            self._close_listener()  # new connections are refused
            self._drop_connections()
        elif self._listener is None:
            self._listen()

    @contextlib.contextmanager
    def mode_while(self, mode: str):
        """``with proxy.mode_while("hang"): ...`` and back to pass afterwards, whatever happens."""
        self.set_mode(mode)
        try:
            yield self
        finally:
            self.set_mode(PASS)

    # -- internals

    def _spawn(self, target, name: str, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        sock.settimeout(self.POLL)
        self.port = sock.getsockname()[1]
        with self._lock:
            self._listener = sock

    def _close_listener(self) -> None:
        with self._lock:
            sock, self._listener = self._listener, None
        if sock is not None:
            sock.close()

    def _drop_connections(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, set()
        for sock in connections:
            _reset(sock)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                time.sleep(self.POLL)
                continue
            try:
                client, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            if self._mode == STOP or self._closed.is_set():
                _reset(client)
                continue
            self.accepted += 1
            with self._lock:
                self._connections.add(client)
            self._spawn(self._relay, f"s3proxy-conn-{self.accepted}", client)

    def _wait_while_hung(self) -> None:
        with self._changed:
            while self._mode == HANG and not self._closed.is_set():
                self._changed.wait(self.POLL)

    def _relay(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            while not self._closed.is_set():
                self._wait_while_hung()
                if self._mode == STOP or self._closed.is_set() or client.fileno() < 0:
                    return
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=5)
                    with self._lock:
                        self._connections.add(upstream)
                readable, _, _ = select.select([client, upstream], [], [], self.POLL)
                for sock in readable:
                    if self._mode != PASS:
                        break  # switched to hang/stop: leave the bytes where they are
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        self.requests += [m.decode("latin-1") for m in REQUEST_LINE.findall(data)]
                    (upstream if sock is client else client).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._connections.discard(client)
                if upstream is not None:
                    self._connections.discard(upstream)
            for sock in (client, upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()


def _reset(sock: socket.socket) -> None:
    """Closes ``sock`` with a TCP reset (SO_LINGER 0), so the peer sees the connection die at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


# ---------------------------------------------------------------- index shards


class Shard:
    """An index shard process on a fixed port and data dir, so it can come back at the same address."""

    def __init__(self, workdir: Path, name: str, env: dict | None = None):
        self.workdir = Path(workdir)
        self.name = name
        self.data_dir = self.workdir / name
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.env = env
        self.port = 0
        self.proc: ServiceProcess | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "Shard":
        self.starts += 1
        proc = ServiceProcess("index_service", ["--data-dir", str(self.data_dir), "--port", str(self.port),
                                               "--drain-delay-seconds", "0"],
                              self.workdir, env=self.env, name=f"{self.name}-run{self.starts}")
        self.proc = proc.start(timeout)
        self.port = self.proc.port
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.running()

    def kill(self) -> None:
        """SIGKILL: the shard dies with no chance to clean up."""
        if self.proc is not None:
            self.cont()  # a stopped process still dies on SIGKILL, but leave it runnable anyway
            self.proc.kill()

    def freeze(self) -> None:
        """SIGSTOP: the process keeps its socket open (connections are accepted by the kernel) and answers nothing."""
        self.proc.signal(signal.SIGSTOP)

    def cont(self) -> None:
        if self.running():
            self.proc.signal(signal.SIGCONT)

    @contextlib.contextmanager
    def frozen(self):
        self.freeze()
        try:
            yield self
        finally:
            self.cont()

    def restart(self, timeout: float = 60.0) -> "Shard":
        """Brings a killed (or running) shard back on the same port and data dir."""
        assert self.port, "restart needs a shard that ran once"
        if self.running():
            self.kill()
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.start(timeout)
            except (RuntimeError, TimeoutError):  # the port may linger for a moment after SIGKILL
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def ensure_running(self) -> "Shard":
        self.cont()
        return self if self.running() else self.restart()

    def terminate(self) -> None:
        if self.proc is not None:
            self.cont()
            self.proc.terminate(10)

    def log_text(self) -> str:
        return self.proc.log_text() if self.proc is not None else ""


def start_shards(workdir: Path, count: int = 2, prefix: str = "shard", env: dict | None = None) -> list[Shard]:
    return [Shard(workdir, f"{prefix}-{i}", env=env).start() for i in range(count)]


# ---------------------------------------------------------------- invariant and repair


def index_channel(address: str) -> grpc.Channel:
    """A channel to one shard with its own subchannel pool: after a shard restart it connects afresh
    instead of sharing the reconnect backoff of older channels to that address in this process."""
    return grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 256 << 20),
                                                   ("grpc.max_receive_message_length", 256 << 20),
                                                   ("grpc.use_local_subchannel_pool", 1)])


def index_stub(address: str) -> index_service_pb2_grpc.IndexServiceStub:
    return index_service_pb2_grpc.IndexServiceStub(index_channel(address))


def stored_ids(s3, bucket: str, prefix: str, collection: str) -> set[str]:
    """Ids of the objects under ``<prefix><collection>/``: keys whose last segment is 64 lowercase hex."""
    ids: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}{collection}/"):
        for obj in page.get("Contents", []):
            last = obj["Key"].rsplit("/", 1)[-1]
            if IMAGE_ID.match(last):
                ids.add(last)
    return ids


def all_keys(s3, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


def shard_ids(address: str, collection: str, timeout: float = 10.0) -> set[str]:
    """Every id of ``collection`` on one shard (ListVectors, all pages); empty when the shard has no such collection."""
    ids: set[str] = set()
    token = ""
    with index_channel(address) as channel:
        stub = index_service_pb2_grpc.IndexServiceStub(channel)
        while True:
            try:
                page = stub.ListVectors(
                    ipb.ListVectorsRequest(collection=collection, page_size=1000, page_token=token), timeout=timeout)
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    return ids
                raise
            ids.update(record.id for record in page.records)
            if not page.next_page_token:
                return ids
            token = page.next_page_token


def indexed_ids(shard_addresses, collection: str) -> set[str]:
    out: set[str] = set()
    for address in shard_addresses:
        out |= shard_ids(address, collection)
    return out


def check_invariant(s3, bucket: str, prefix: str, collection: str, shard_addresses) -> tuple[set[str], set[str]]:
    """Asserts that every indexed id has its stored object; returns (stored ids, indexed ids)."""
    stored = stored_ids(s3, bucket, prefix, collection)
    indexed = indexed_ids(shard_addresses, collection)
    orphans = sorted(indexed - stored)
    assert not orphans, (
        f"every indexed id has its stored object: {len(orphans)} of {len(indexed)} indexed ids in "
        f"{collection!r} have no object under {prefix}{collection}/: {orphans}"
    )
    return stored, indexed


def wait_repair(client, collection: str, timeout: float = 30.0) -> gpb.RepairJob:
    """Starts RepairCollection(collection) and polls GetRepairJob until it is no longer running."""
    job = client.RepairCollection(gpb.RepairCollectionRequest(collection=collection)).job
    deadline = time.monotonic() + timeout
    while job.state == gpb.REPAIR_STATE_RUNNING:
        if time.monotonic() > deadline:
            raise TimeoutError(f"repair {job.job_id} of {collection!r} still running after {timeout}s: {job}")
        time.sleep(0.1)
        job = client.GetRepairJob(gpb.GetRepairJobRequest(job_id=job.job_id)).job
    return job
