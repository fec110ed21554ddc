"""The synthetic shapes generator: deterministic by seed, captions true of their images."""

from __future__ import annotations

import json

import numpy as np

from clipsearch import synthetic


def pixels(sample: synthetic.Sample) -> np.ndarray:
    return np.asarray(sample.image)


def test_same_seed_same_samples():
    first, second = synthetic.generate(12, seed=3), synthetic.generate(12, seed=3)
    for a, b in zip(first, second):
        assert a.caption == b.caption
        assert a.objects == b.objects
        assert np.array_equal(pixels(a), pixels(b))


def test_sample_does_not_depend_on_n():
    short, long = synthetic.generate(4, seed=9), synthetic.generate(10, seed=9)
    assert [s.caption for s in short] == [s.caption for s in long[:4]]
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(short, long))


def test_other_seed_other_samples():
    a, b = synthetic.generate(10, seed=1), synthetic.generate(10, seed=2)
    assert [s.objects for s in a] != [s.objects for s in b]


def test_image_size_and_mode():
    for sample in synthetic.generate(5, seed=4, size=96):
        assert sample.image.size == (96, 96)
        assert sample.image.mode == "RGB"


def test_captions_are_true_of_their_images():
    samples = synthetic.generate(300, seed=5)
    for sample in samples:
        assert 1 <= len(sample.objects) <= 2
        assert len(sample.mentions) == len(sample.objects)
        assert synthetic.caption_matches(sample.mentions, sample.objects)
        for obj in sample.objects:
            assert obj.shape in synthetic.SHAPES and obj.colour in synthetic.COLOURS
            assert obj.size in synthetic.SIZES and obj.position in synthetic.POSITIONS
            assert obj.colour in sample.caption
            assert any(word in sample.caption for word in synthetic.SHAPE_WORDS[obj.shape])
        for mention in sample.mentions:
            if mention.position is not None:
                assert any(word in sample.caption for word in synthetic.POSITION_WORDS[mention.position])
            if mention.size is not None:
                assert any(word in sample.caption for word in synthetic.SIZE_WORDS[mention.size])
    assert any(len(sample.objects) == 2 for sample in samples)
    assert len({sample.caption for sample in samples}) > 150  # paraphrases, not one template


def test_two_objects_differ_and_sit_apart():
    for sample in synthetic.generate(200, seed=6):
        if len(sample.objects) == 2:
            a, b = sample.objects
            assert (a.shape, a.colour) != (b.shape, b.colour)
            assert {a.position, b.position} in ({"left", "right"}, {"top", "bottom"})


def test_caption_matches_rules():
    red_circle = synthetic.ObjectSpec("circle", "red", "small", "left")
    blue_star = synthetic.ObjectSpec("star", "blue", "large", "right")
    assert synthetic.caption_matches([synthetic.ObjectSpec("circle", "red", None, None)], [red_circle, blue_star])
    assert not synthetic.caption_matches([synthetic.ObjectSpec("circle", "blue", None, None)], [red_circle, blue_star])
    assert not synthetic.caption_matches([synthetic.ObjectSpec("circle", "red", "large", None)], [red_circle])
    assert not synthetic.caption_matches(
        [synthetic.ObjectSpec("circle", "red", None, None), synthetic.ObjectSpec("star", "yellow", None, None)],
        [red_circle, blue_star])


def test_shape_colour_queries_list_exactly_the_matching_images():
    samples = synthetic.generate(80, seed=7)
    queries = synthetic.shape_colour_queries(samples)
    assert queries
    for text, relevant in queries:
        colour, shape = text.split()[1:]
        assert relevant == [i for i, s in enumerate(samples) if s.has(shape, colour)]


def test_generate_including_holds_the_required_objects():
    samples = synthetic.generate_including(30, seed=8, required=[("circle", "red"), ("star", "yellow")], copies=3)
    assert len(samples) == 30
    assert sum(s.has("circle", "red") for s in samples) >= 3
    assert sum(s.has("star", "yellow") for s in samples) >= 3
    again = synthetic.generate_including(30, seed=8, required=[("circle", "red"), ("star", "yellow")], copies=3)
    assert [s.caption for s in samples] == [s.caption for s in again]


def test_write_dataset(tmp_path):
    synthetic.write_dataset(tmp_path, 20, seed=11)
    captions = json.loads((tmp_path / "captions.json").read_text())
    assert len(captions["images"]) == len(captions["annotations"]) == 20
    for entry in captions["images"]:
        assert (tmp_path / "images" / entry["file_name"]).is_file()
    labels = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    queries = [json.loads(line) for line in (tmp_path / "queries.jsonl").read_text().splitlines()]
    for query in queries:
        colour, shape = query["query"].split()[1:]
        expected = [label["file_name"] for label in labels
                    if any(o["shape"] == shape and o["colour"] == colour for o in label["objects"])]
        assert query["relevant"] == expected
