"""``clipsearch``: run a local stack, import images, search, and manage collections.

    clipsearch up --demo                 # local stack on the bundled demo model (Ctrl-C stops it)
    clipsearch import ./photos           # upload a folder, with progress; rerun to resume
    clipsearch search "a red circle"     # table of results (or --json)
    clipsearch search --image cat.jpg --top-k 5 --filter album=pets
    clipsearch demo                      # all of the above, then shut down
    clipsearch repair --dry-run          # what a repair of the collection would fix

Commands find the stack that ``up`` started; ``--target HOST:PORT`` (or
CLIPSEARCH_TARGET) points them at any gateway instead.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import io
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from clipsearch.client import DEFAULT_TARGET, Client, SearchResults, TlsConfig
from clipsearch.errors import ClipsearchError, NotFound
from clipsearch.image_formats import is_image_file_name

DEMO_QUERIES = ["a red circle", "a blue square", "a yellow star"]


# -- helpers -------------------------------------------------------------------

def resolve_target(args) -> str:
    if args.target:
        return args.target
    from clipsearch.stack import read_stack

    stack = read_stack()
    return stack["target"] if stack else DEFAULT_TARGET


def make_client(args) -> Client:
    tls: bool | TlsConfig = False
    if args.tls or args.tls_ca:
        tls = TlsConfig(root_certificates=Path(args.tls_ca).read_bytes() if args.tls_ca else None)
    return Client(resolve_target(args), api_key=args.api_key or None, tls=tls, collection=args.collection,
                  timeout=args.timeout)


def parse_value(text: str) -> Any:
    """A number, an ISO date or time (``2020-01-01``, ``2020-01-01T12:00:00+02:00``; UTC when no
    zone is given), else the text itself."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        return text
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def parse_filters(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` (equals), ``key=a|b`` (in-set), ``key>=3``, ``key<10``, ``key=lo..hi`` (ranges,
    ends included). Numbers stay numbers; ISO dates (``date>=2020-01-01``) are timestamps."""
    value = parse_value
    result: dict[str, Any] = {}
    for pair in pairs:
        for op, bound in ((">=", "gte"), ("<=", "lte"), (">", "gt"), ("<", "lt")):
            if op in pair:
                key, raw = pair.split(op, 1)
                result.setdefault(key.strip(), {})[bound] = value(raw.strip())
                break
        else:
            if "=" not in pair:
                raise SystemExit(f"error: --filter {pair!r}: use key=value, key=a|b, key>=x, key<y or key=lo..hi")
            key, raw = pair.split("=", 1)
            low, dots, high = raw.partition("..")
            if dots and low and high:
                result.setdefault(key.strip(), {}).update(gte=value(low.strip()), lte=value(high.strip()))
                continue
            options = [value(v) for v in raw.split("|")]
            result[key.strip()] = options if len(options) > 1 else options[0]
    return result


def display_url(url: str) -> str:
    return url.removeprefix("file://") if url.startswith("file://") else url


def print_results(results: SearchResults, title: str = "", label: tuple[str, Any] | None = None) -> None:
    """A table: rank, score, id, file name, url/path; ``label`` = (header, hit -> text) adds a column
    before the url."""
    if title:
        print(f"\n{title}")
    if not results.hits:
        print("  (no results)")
        return
    header, describe = label or ("", None)
    width = max([len(header)] + [len(describe(h)) for h in results.hits]) if describe else 0
    extra = f"  {header:<{width}}" if describe else ""
    names = [str(h.metadata.get("filename", "")) for h in results.hits]
    name_width = max(len("file"), *map(len, names))
    print(f"  {'rank':>4}  {'score':>7}  {'id':<64}  {'file':<{name_width}}{extra}  url/path")
    for rank, (hit, name) in enumerate(zip(results.hits, names), 1):
        extra = f"  {describe(hit):<{width}}" if describe else ""
        print(f"  {rank:>4}  {hit.score:>7.4f}  {hit.id:<64}  {name:<{name_width}}{extra}  {display_url(hit.url)}")
    if results.partial:
        print(f"  (partial: shards {', '.join(results.missing_shards)} did not answer)")
    if results.next_page_token:
        print(f"  next page: --page-token {results.next_page_token}")


def results_json(results: SearchResults) -> str:
    return json.dumps({
        "hits": [{"id": h.id, "score": h.score, "url": h.url, "metadata": h.metadata} for h in results.hits],
        "next_page_token": results.next_page_token, "partial": results.partial,
        "missing_shards": results.missing_shards,
    }, indent=2, default=str)


# -- import ------------------------------------------------------------------------

def list_image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file_name(p.name))


def import_checkpoint_path(target: str, folder: Path, collection: str, collection_uid: str = "") -> Path:
    """The checkpoint of one folder's import into one collection; keyed by the collection's uid
    too, so a collection deleted and created again starts from nothing."""
    from clipsearch.stack import state_dir

    key = hashlib.sha256(f"{target}|{folder.resolve()}|{collection}|{collection_uid}".encode()).hexdigest()[:20]
    return state_dir() / "imports" / f"{key}.done"


def read_sidecar(path: str) -> dict[str, dict[str, Any]]:
    """Metadata per file from a sidecar: JSON ``{"a.jpg": {"album": "x", "year": 2020}, ...}`` or a
    CSV whose first column is the file name (relative to the folder, or the bare name) and whose
    other columns are metadata keys (numbers and ISO dates parsed; empty cells skipped)."""
    text = Path(path).read_text()
    if path.lower().endswith(".csv"):
        rows = list(csv.reader(io.StringIO(text)))
        if not rows or len(rows[0]) < 2:
            raise SystemExit(f"error: {path}: a CSV sidecar needs a header: filename,key1,key2,...")
        header = rows[0]
        return {row[0]: {k: parse_value(v) for k, v in zip(header[1:], row[1:]) if v != ""} for row in rows[1:]
                if row}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SystemExit(f"error: {path}: not JSON ({exc}); use a .json or .csv sidecar") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise SystemExit(f'error: {path}: expected {{"file name": {{"key": value, ...}}, ...}}')
    return {name: {k: parse_value(v) if isinstance(v, str) else v for k, v in meta.items()}
            for name, meta in data.items()}


def import_folder(client: Client, folder: Path, *, batch_size: int = 16, metadata: dict | None = None,
                  progress: bool = True, sidecar: dict[str, dict[str, Any]] | None = None) -> dict[str, int]:
    """Uploads every image under ``folder`` in batches, with a progress bar.

    Files already imported (recorded in a checkpoint under the state dir) are
    skipped, so an interrupted import resumes where it stopped; uploads are
    content-addressed, so no image is ever stored twice either way.
    """
    from tqdm import tqdm

    files = list_image_files(folder)
    uid = client.get_collection(client.collection).uid
    checkpoint = import_checkpoint_path(client.target, folder, client.collection, uid)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    done = set(checkpoint.read_text().splitlines()) if checkpoint.exists() else set()
    pending = [p for p in files if str(p.relative_to(folder)) not in done]
    counts = {"found": len(files), "already_done": len(files) - len(pending), "imported": 0, "duplicates": 0,
              "failed": 0}
    bar = tqdm(total=len(files), initial=counts["already_done"], unit="img", desc="import", disable=not progress,
               dynamic_ncols=True)
    failures: list[str] = []
    with open(checkpoint, "a") as record:
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            results = client.upload_files(batch, metadata=metadata, file_metadata=[
                (sidecar or {}).get(path.relative_to(folder).as_posix()) or (sidecar or {}).get(path.name)
                for path in batch])
            for path, result in zip(batch, results):
                if result.ok:
                    counts["imported" if result.created else "duplicates"] += 1
                    record.write(f"{path.relative_to(folder)}\n")
                else:
                    counts["failed"] += 1
                    failures.append(f"{path}: {result.error_code}: {result.error}")
            record.flush()
            os.fsync(record.fileno())
            bar.update(len(batch))
    bar.close()
    for failure in failures[:20]:
        print(f"  failed: {failure}", file=sys.stderr)
    return counts


def follow_job(job, poll: Callable[[str], Any], *, desc: str, unit: str, position: Callable[[Any], int],
               total: Callable[[Any], int | None] = lambda job: None, progress: bool = True):
    """Follows a server-side job (import, repair) with a progress bar until it ends,
    polling ``poll(job_id)``; prints the first errors and returns the final job."""
    from tqdm import tqdm

    bar = tqdm(total=total(job), unit=unit, desc=desc, disable=not progress, dynamic_ncols=True)
    while True:
        bar.total = total(job)
        bar.n = position(job)
        bar.refresh()
        if job.done:
            break
        time.sleep(0.5)
        job = poll(job.job_id)
    bar.close()
    for key, message in job.errors[:20]:
        print(f"  failed: {key}: {message}", file=sys.stderr)
    return job


def import_s3(client: Client, source: str, *, progress: bool = True) -> dict[str, int]:
    """Starts (or resumes) a server-side import job and follows it with a progress bar."""
    job = follow_job(client.import_images(source), client.get_import_job, desc="import", unit="img",
                     position=lambda j: j.processed, total=lambda j: j.total or None, progress=progress)
    if job.state == "FAILED":
        raise SystemExit(f"error: import job {job.job_id} failed")
    return {"found": job.total, "imported": job.imported, "skipped": job.skipped, "failed": job.failed}


# -- commands --------------------------------------------------------------------

def stack_config(args):
    from clipsearch.stack import StackConfig, default_data_dir, demo_model_dir

    model, pretrained = args.model, args.pretrained
    if args.demo:
        model, pretrained = str(demo_model_dir()), "none"
    return StackConfig(
        data_dir=Path(args.data_dir) if args.data_dir else default_data_dir(), model=model, pretrained=pretrained, shards=args.shards,
        storage=args.storage, gateway_port=args.port, s3_endpoint_url=args.s3_endpoint_url,
        api_keys_file=args.api_keys_file, device=args.device, http_port=args.http_port,
    )


def cmd_keys_create(args) -> int:
    from clipsearch.keys import key_entry, keys_file_text, new_secret

    secret = new_secret()
    try:
        entry = key_entry(args.id, secret, args.scope, args.import_source)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"secret (shown once; clients send it as 'authorization: Bearer <secret>'):\n  {secret}\n")
    print("add this entry under 'keys:' in the gateway's keys file (it is re-read on change):")
    print("  " + keys_file_text([entry]).split("\n", 1)[1].replace("\n", "\n  ").rstrip())
    return 0


def cmd_up(args) -> int:
    from clipsearch.stack import LocalStack

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack = LocalStack(stack_config(args))
    print(f"starting encoder ({stack.config.model}), {args.shards} index shard(s) and the gateway ...", flush=True)
    stack.start()
    stack.record()
    info = stack.describe()
    print(f"data dir {info['data_dir']}")
    for name, service in info["services"].items():
        print(f"  {name:<10} grpc {service['address']:<22} metrics {service['metrics'] or '-':<36} "
              f"log {service['log']}")
    print(f"gateway ready at {info['target']}  (Ctrl-C to stop)", flush=True)
    web = info["services"]["gateway"].get("web")
    if web:
        print(f"web page and HTTP/JSON API at {web}  (OpenAPI: {web}openapi.json)", flush=True)
    try:
        while not stop.wait(0.5):
            exited = stack.first_exited()
            if exited is not None:
                print(f"error: {exited.name} exited with code {exited.proc.returncode}; see {exited.log_path}",
                      file=sys.stderr)
                return 1
    finally:
        print("stopping ...", flush=True)
        stack.stop()
        print("stopped", flush=True)
    return 0


def cmd_down(args) -> int:
    from clipsearch.stack import read_stack

    stack = read_stack()
    if stack is None:
        print("no local stack is running")
        return 0
    os.kill(stack["pid"], signal.SIGTERM)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        if read_stack() is None:  # `up` forgets the stack once every service has stopped
            print("stopped")
            return 0
        time.sleep(0.2)
    print(f"error: the stack (pid {stack['pid']}) is still stopping", file=sys.stderr)
    return 1


def cmd_import(args) -> int:
    with make_client(args) as client:
        if args.source.startswith("s3://"):
            counts = import_s3(client, args.source, progress=not args.quiet)
        else:
            folder = Path(args.source)
            if not folder.is_dir():
                raise SystemExit(f"error: {args.source} is not a folder or an s3:// prefix")
            counts = import_folder(client, folder, batch_size=args.batch_size, progress=not args.quiet,
                                   sidecar=read_sidecar(args.metadata) if args.metadata else None)
    print(json.dumps(counts) if args.json else "  ".join(f"{k}={v}" for k, v in counts.items()))
    return 1 if counts.get("failed") else 0


def read_queries_file(path: str) -> list[str | dict]:
    """One query per line: a text, or a JSON object of search options ({"text": ..., "image": PATH,
    "filter": {...}, "top_k": 5, ...}); blank lines and lines starting with # are skipped."""
    queries: list[str | dict] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                queries.append(json.loads(line))
            except ValueError as exc:
                raise SystemExit(f"error: {path}:{number}: not a JSON object: {exc}") from None
        else:
            queries.append(line)
    if not queries:
        raise SystemExit(f"error: {path} holds no queries")
    return queries


def cmd_batch_search(args) -> int:
    """--queries-file: every query in one BatchSearchImages call; a failed query is reported alone."""
    queries = read_queries_file(args.queries_file)
    with make_client(args) as client:
        results = client.batch_search(queries, top_k=args.top_k, min_score=args.min_score,
                                      filter=parse_filters(args.filter), diversity=args.diversity)
    if args.json:
        print(json.dumps([json.loads(results_json(r)) if r.ok else {"error_code": r.error_code, "error": r.error}
                          for r in results], indent=2))
    else:
        for query, result in zip(queries, results):
            title = f"results for {query!r}" if isinstance(query, str) else f"results for {json.dumps(query)}"
            if result.ok:
                print_results(result, title)
            else:
                print(f"\n{title}\n  error: {result.error_code}: {result.error}")
    return 0 if all(r.ok for r in results) else 1


def cmd_search(args) -> int:
    if args.queries_file:
        return cmd_batch_search(args)
    from clipsearch.client import Query

    parts = ([Query.text(args.text)] if args.text else []) + [Query.image(p) for p in args.image] + [
        Query.image_id(i) for i in args.image_id]
    if not parts:
        raise SystemExit("error: give a text, --image PATH, --image-id ID or --queries-file FILE")
    if args.weight:
        if len(args.weight) != len(parts):
            raise SystemExit(f"error: {len(args.weight)} --weight for {len(parts)} query parts (the text, then "
                             "each --image, then each --image-id)")
        for part, weight in zip(parts, args.weight):
            part.part.weight = weight
    with make_client(args) as client:
        results = client.search(
            parts=parts, aggregation=args.aggregation, top_k=args.top_k,
            min_score=args.min_score, filter=parse_filters(args.filter), diversity=args.diversity,
            page_size=args.page_size, page_token=args.page_token, nprobe=args.nprobe, ef_search=args.ef_search,
            positive_ids=args.more_like, negative_ids=args.less_like,
        )
    if args.json:
        print(results_json(results))
    else:
        print_results(results, f"results for {args.text!r}" if args.text else "")
    return 0


def cmd_get(args) -> int:
    with make_client(args) as client:
        image = client.get(args.id)
    print(json.dumps({"id": image.id, "url": image.url, "metadata": image.metadata, "size_bytes": image.size_bytes,
                      "content_type": image.content_type}, indent=2, default=str))
    return 0


def cmd_delete(args) -> int:
    with make_client(args) as client:
        for image_id in args.ids:
            client.delete(image_id)
            print(f"deleted {image_id}")
    return 0


def cmd_collections(args) -> int:
    with make_client(args) as client:
        if args.action == "create":
            collections = [client.create_collection(args.name, index_spec=args.index_spec)]
        elif args.action == "delete":
            deletion = client.delete_collection(args.name)
            if deletion.pending:
                print(f"deleted collection {args.name}; pending: waiting for shards "
                      f"{', '.join(deletion.waiting_for_shards)} (the gateway finishes when they return)")
            else:
                print(f"deleted collection {args.name}")
            return 0
        else:
            collections = client.list_collections()
    print(f"  {'name':<20} {'vectors':>10} {'dim':>5} {'index':<16} {'trained':<8} {'memory':>12}")
    for c in collections:
        print(f"  {c.name:<20} {c.vector_count:>10} {c.dim:>5} {c.index_spec:<16} {str(c.trained):<8} "
              f"{c.memory_bytes:>12}")
    return 0


REPAIR_COUNTS = ("checked", "reindexed", "dropped", "removed", "failed")


def cmd_repair(args) -> int:
    """Starts (or resumes) a repair of the collection and follows it to the end."""
    with make_client(args) as client:
        def poll(job_id: str):
            try:
                return client.get_repair_job(job_id)
            except NotFound:
                # Another gateway replica answered; starting again resumes the same repair there.
                return client.repair(dry_run=args.dry_run)

        job = follow_job(client.repair(dry_run=args.dry_run), poll, desc="repair", unit="id",
                         position=lambda j: j.checked, progress=not args.quiet)
    counts = {name: getattr(job, name) for name in REPAIR_COUNTS}
    if args.json:
        print(json.dumps({"job_id": job.job_id, "collection": job.collection, "state": job.state,
                          "dry_run": job.dry_run, **counts, "dropped_ids": job.dropped_ids}))
    else:
        print(f"{job.state.lower()}{' (dry run: nothing changed)' if job.dry_run else ''}  "
              + "  ".join(f"{k}={v}" for k, v in counts.items()))
        shown = job.dropped_ids[:20]
        for image_id in shown:
            print(f"  dropped: {image_id}")
        if job.dropped > len(shown):
            print(f"  ... and {job.dropped - len(shown)} more dropped")
    return 0 if job.state == "SUCCEEDED" else 1


def cmd_stats(args) -> int:
    from clipsearch.stack import read_stack

    with make_client(args) as client:
        collections = client.list_collections()
    stack = read_stack()
    report = {
        "target": resolve_target(args),
        "local_stack": stack["services"] if stack else None,
        "collections": [c.__dict__ for c in collections],
    }
    print(json.dumps(report, indent=2, default=str))
    return 0


def cmd_eval(extra: list[str]) -> int:
    """``clipsearch eval [OPTIONS]``: every option goes to ``python -m clipsearch.eval`` (a leading
    ``--`` is allowed); CLIPSEARCH_TARGET is its --target unless --target or --model is given."""
    from clipsearch import eval as evaluation

    extra = extra[1:] if extra[:1] == ["--"] else list(extra)
    target = os.environ.get("CLIPSEARCH_TARGET", "")
    if target and not any(a.startswith(("--target", "--model")) for a in extra):
        extra = ["--target", target, *extra]
    return evaluation.main(extra)


def cmd_imports(args) -> int:
    with make_client(args) as client:
        if args.action == "cancel":
            if not args.job_id:
                raise SystemExit("error: imports cancel needs a JOB_ID (see `clipsearch imports list`)")
            jobs = [client.cancel_import_job(args.job_id)]
        else:
            jobs, token = client.list_import_jobs(collection=args.collection)
            while token:
                more, token = client.list_import_jobs(collection=args.collection, page_token=token)
                jobs += more
    if args.json:
        print(json.dumps([job.__dict__ for job in jobs], indent=2, default=str))
        return 0
    print(f"  {'job id':<28} {'collection':<16} {'state':<10} {'done':>12} {'imported':>9} {'skipped':>8} "
          f"{'failed':>7}  source")
    for job in jobs:
        done = f"{job.processed}/{job.total}"
        print(f"  {job.job_id:<28} {job.collection:<16} {job.state:<10} {done:>12} {job.imported:>9} "
              f"{job.skipped:>8} {job.failed:>7}  {job.source}")
    return 0


def demo_labels(folder: Path) -> dict[str, str]:
    """file name -> what the synthetic image shows ("small red circle, left + blue star, right")."""
    labels = {}
    for line in (folder / "labels.jsonl").read_text().splitlines():
        entry = json.loads(line)
        labels[entry["file_name"]] = " + ".join(
            f"{o['size']} {o['colour']} {o['shape']}, {o['position']}" for o in entry["objects"])
    return labels


def cmd_demo(args) -> int:
    """Local stack on the demo model, sample images, import, three queries, shut down."""
    from clipsearch import synthetic
    from clipsearch.stack import LocalStack

    args.demo = True
    data_dir = Path(args.data_dir)
    samples = data_dir / "sample-images"
    if not (samples.exists() and list_image_files(samples)):
        print(f"generating {args.images} sample images in {samples} ...", flush=True)
        synthetic.write_dataset(samples, n=args.images, seed=args.seed, size=96, image_format="jpg")
    stack = LocalStack(stack_config(args))
    print("starting the local stack on the bundled demo model ...", flush=True)
    started = time.monotonic()
    stack.start()
    try:
        print(f"stack ready in {time.monotonic() - started:.1f}s; gateway at {stack.gateway_address}", flush=True)
        with Client(stack.gateway_address) as client:
            counts = import_folder(client, samples, batch_size=32)
            print("  ".join(f"{k}={v}" for k, v in counts.items()))
            shows = demo_labels(samples)
            for query in DEMO_QUERIES:
                print_results(client.search(query, top_k=5), f"top 5 for {query!r}",
                              label=("what the image shows", lambda hit: shows.get(hit.metadata.get("filename"), "?")))
    finally:
        print("\nshutting down ...", flush=True)
        stack.stop()
    print("done")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipsearch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=os.environ.get("CLIPSEARCH_TARGET", ""),
                        help="gateway HOST:PORT (default: the stack `up` started, else 127.0.0.1:50050)")
    common.add_argument("--api-key", default=os.environ.get("CLIPSEARCH_API_KEY", ""),
                        help="API key (env CLIPSEARCH_API_KEY)")
    common.add_argument("--collection", default="", help="collection (default: the gateway's default)")
    common.add_argument("--tls", action="store_true", help="use TLS with the system's CA roots")
    common.add_argument("--tls-ca", default="", help="PEM CA bundle to trust (implies --tls)")
    common.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stack_flags(data_dir: str, port: int, http_port: int = -1) -> argparse.ArgumentParser:
        """The flags `up` and `demo` share, each with its own defaults (a parser per command, so
        one command's defaults never leak into the other's)."""
        flags = argparse.ArgumentParser(add_help=False)
        flags.add_argument("--data-dir", default=data_dir, help=f"where shards, images and logs live (default: "
                                                                f"{data_dir or '$CLIPSEARCH_STATE_DIR/data, else ~/.clipsearch/data'})")
        flags.add_argument("--model", default="ViT-B-32", help="open_clip model name or model folder")
        flags.add_argument("--pretrained", default="openai", help="pretrained tag, checkpoint file, or none")
        flags.add_argument("--demo", action="store_true", help="use the bundled demo model (offline)")
        flags.add_argument("--device", default="auto", help="auto, cpu or cuda")
        flags.add_argument("--shards", type=int, default=2, help="index shard processes")
        flags.add_argument("--storage", default="", help="DIR or s3://bucket/prefix (default: DATA_DIR/images)")
        flags.add_argument("--s3-endpoint-url", default="", help="S3 endpoint (MinIO); empty = AWS")
        flags.add_argument("--port", type=int, default=port, help=f"gateway port (default {port}; 0 = any free port)")
        flags.add_argument("--http-port", type=int, default=http_port,
                           help=f"the gateway's HTTP/JSON API and web page (default {http_port}; 0 = any free port, "
                                "-1 = off)")
        flags.add_argument("--api-keys-file", default="",
                           help="the gateway's YAML keys file (see `clipsearch keys create`); empty = no auth")
        return flags

    p = sub.add_parser("up", parents=[stack_flags("", 50050, 8080)], help="start a local stack (encoder, index shards, "
                       "gateway)", description="Starts a local stack. Every service also reads the CLIPSEARCH_* "
                       "environment settings (and the YAML file CLIPSEARCH_CONFIG names); the flags here win.")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop the local stack started by `up`")
    p.add_argument("--wait", type=float, default=60.0)
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("demo", parents=[stack_flags("./data/demo", 0)], help="run the offline demo end to end")
    p.add_argument("--images", type=int, default=300, help="sample images to generate")
    p.add_argument("--seed", type=int, default=2024)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("keys", help="API keys for the gateway's keys file")
    keys_sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    k = keys_sub.add_parser("create", help="print a new secret and the keys-file entry (with its sha256) to add",
                            description="Prints a new API key secret once, and the YAML entry for the gateway's "
                                        "keys file. The file holds only the sha256 of the secret.")
    k.add_argument("--id", required=True, help="key id (shown in audit logs and errors)")
    k.add_argument("--scope", action="append", default=[], required=True,
                   help="read:PATTERN, write:PATTERN, admin:PATTERN or admin (global); repeat for more")
    k.add_argument("--import-source", action="append", default=[],
                   help="s3://bucket/prefix/ or a folder the key may import from (inside the gateway's "
                        "import_sources); repeat for more")
    k.set_defaults(func=cmd_keys_create)

    p = sub.add_parser("import", parents=[common], help="import a folder or s3://bucket/prefix (resumable)")
    p.add_argument("source", help="a local folder or s3://bucket/prefix")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--metadata", default="", metavar="SIDECAR",
                   help="metadata per file: a .json {\"name.jpg\": {\"key\": value}} or a .csv with a header "
                        "filename,key1,key2 (names relative to the folder, or bare file names)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("search", parents=[common], help="search by text or image")
    p.add_argument("text", nargs="?", default="")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="search by this image file (repeat for more parts)")
    p.add_argument("--image-id", action="append", default=[], metavar="ID",
                   help="search by a stored image (repeat for more parts)")
    p.add_argument("--aggregation", choices=["mean", "max"], default="mean",
                   help="how several parts combine: mean (one weighted query) or max (best part per image)")
    p.add_argument("--weight", action="append", type=float, default=[],
                   help="one per part, in order: the text, each --image, each --image-id (default 1)")
    p.add_argument("--nprobe", type=int, default=0, help="IVF lists to visit (0 = the index's default)")
    p.add_argument("--ef-search", type=int, default=0, help="HNSW search depth (0 = the index's default)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--min-score", type=float, default=None)
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="metadata filter: key=value, key=a|b, key>=x, key<y (repeat to AND)")
    p.add_argument("--diversity", type=float, default=0.0, help="MMR diversity in [0, 1]")
    p.add_argument("--more-like", action="append", default=[], metavar="ID", help="relevance feedback: positive id")
    p.add_argument("--less-like", action="append", default=[], metavar="ID", help="relevance feedback: negative id")
    p.add_argument("--page-size", type=int, default=0)
    p.add_argument("--page-token", default="")
    p.add_argument("--queries-file", default="", metavar="FILE",
                   help="run many queries in one BatchSearchImages call: one per line, a text or a JSON object "
                        "of search options ({\"text\": ..., \"image\": PATH, \"filter\": {...}, \"top_k\": 5})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("get", parents=[common], help="show one image")
    p.add_argument("id")
    p.set_defaults(func=cmd_get)
    p = sub.add_parser("delete", parents=[common], help="delete images by id")
    p.add_argument("ids", nargs="+")
    p.set_defaults(func=cmd_delete)
    p = sub.add_parser("collections", parents=[common], help="list, create or delete collections")
    p.add_argument("action", nargs="?", choices=["list", "create", "delete"], default="list")
    p.add_argument("name", nargs="?", default="")
    p.add_argument("--index-spec", default="",
                   help="FAISS spec for create: Flat, IVF1024,Flat, HNSW32,efSearch=128, ... (default: the service's, "
                        "HNSW32)")
    p.set_defaults(func=cmd_collections)
    p = sub.add_parser("repair", parents=[common], help="re-index orphaned images, drop entries of missing ones",
                       description="Starts (or resumes) a repair of the collection on the gateway and follows it: "
                                   "stored images missing from the index are indexed again, index entries whose "
                                   "image is gone are dropped (and listed). Exit status 1 when the repair failed.")
    p.add_argument("--dry-run", action="store_true", help="only count what would be fixed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_repair)
    p = sub.add_parser("stats", parents=[common], help="collections and local stack status as JSON")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("eval", add_help=False, help="retrieval accuracy (Recall@1/5, MRR, NDCG@10); "
                       "`clipsearch eval --help` lists its options")
    p.add_argument("eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda args: cmd_eval(args.eval_args))
    p = sub.add_parser("imports", parents=[common], help="list import jobs, or cancel one")
    p.add_argument("action", nargs="?", choices=["list", "cancel"], default="list")
    p.add_argument("job_id", nargs="?", default="")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_imports)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:  # its options are the evaluation's own, given as they are
        return cmd_eval(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ClipsearchError as error:
        print(f"error: {error.code}: {error.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
