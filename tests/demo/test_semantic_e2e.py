"""Search finds what a sentence means, through the real stack: the bundled demo
model in the encoder service, two index shard processes and the gateway."""

from __future__ import annotations

import io

from clipsearch.client import Client
from clipsearch.synthetic import generate_including

QUERIES = [("a red circle", ("circle", "red")), ("a blue square", ("square", "blue")),
           ("a yellow star", ("star", "yellow"))]


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_text_queries_return_matching_images_in_their_top_5(demo_gateway):
    samples = generate_including(90, seed=31337, required=[labels for _, labels in QUERIES], copies=5, size=96)
    by_id = {}
    with Client(demo_gateway) as client:
        for start in range(0, len(samples), 30):
            batch = samples[start:start + 30]
            results = client.upload([png(s.image) for s in batch])
            assert all(r.ok for r in results), [r.error for r in results if not r.ok]
            by_id.update({r.id: s for r, s in zip(results, batch)})
        for text, (shape, colour) in QUERIES:
            hits = client.search(text, top_k=5)
            matching = [by_id[hit.id].has(shape, colour) for hit in hits]
            assert matching[0], f"{text!r}: top hit is {by_id[hits[0].id].caption!r}"
            assert sum(matching) >= 4, f"{text!r}: top 5 are {[by_id[h.id].caption for h in hits]}"
