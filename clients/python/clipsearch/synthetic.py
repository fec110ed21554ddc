"""Synthetic image-caption data: coloured shapes on varied backgrounds.

The demo model (``models/demo``) is trained on it, and the evaluation harness
and the semantic tests use held-out sets drawn with other seeds. Needs only
Pillow and NumPy.

Every image holds one or two objects. An object is a shape in a colour, with a
size and a position::

    >>> sample = generate(3, seed=7)[0]
    >>> sample.caption
    'a picture of a purple triangle in the centre'
    >>> sample.objects
    [ObjectSpec(shape='triangle', colour='purple', size='large', position='center')]
    >>> sample.mentions  # the caption leaves out the size
    [ObjectSpec(shape='triangle', colour='purple', size=None, position='center')]

Captions come from templates with paraphrases ("a small red circle", "a red
round shape on the left", "a yellow star and a blue square", ...). A caption
may leave out the size or the position; ``Sample.mentions`` records what it
does say, one ``ObjectSpec`` per object named, with ``None`` for what it
leaves out.

Everything is deterministic by seed, and sample ``i`` of a seed does not depend
on ``n``: ``generate(10, seed)[:5] == generate(5, seed)``.

``generate_including(n, seed, required=[("circle", "red")])`` guarantees that
some images hold given objects (for end-to-end tests: upload them, search "a
red circle", check the top 5 with ``Sample.has``).

``write_dataset(folder, n, seed)`` writes the images plus the two evaluation
formats read by ``python -m clipsearch.eval`` (see that module).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLOURS = {
    "red": (220, 30, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 235),
    "yellow": (245, 215, 35),
    "purple": (145, 55, 190),
    "orange": (250, 135, 20),
    "white": (248, 248, 248),
    "black": (18, 18, 18),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")

# Object centre (x, y) as fractions of the image side, and radius ranges.
POSITION_CENTRES = {
    "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5),
}
SIZE_RADII = {"small": (0.10, 0.13), "large": (0.19, 0.24)}
# Two objects sit on opposite sides so that their position words stay true.
POSITION_PAIRS = (("left", "right"), ("top", "bottom"))

SHAPE_WORDS = {
    "circle": ("circle", "circle", "round shape", "disc"),
    "square": ("square", "square", "box", "square shape"),
    "triangle": ("triangle", "triangle", "triangular shape"),
    "star": ("star", "star", "star shape"),
    "hexagon": ("hexagon", "hexagon", "six-sided shape"),
    "cross": ("cross", "cross", "plus sign"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "large")}
POSITION_WORDS = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "center": ("in the center", "in the middle", "in the centre"),
}
PREFIXES = ("", "", "", "a picture of ", "an image of ", "a photo of ")
BACKGROUND_KINDS = ("solid", "gradient", "noise", "stripes", "checker")


class ObjectSpec(NamedTuple):
    """One drawn object; in ``Sample.mentions`` a field is None when the caption leaves it out."""

    shape: str | None
    colour: str | None
    size: str | None
    position: str | None


@dataclass
class Sample:
    image: Image.Image
    caption: str
    objects: list[ObjectSpec]
    mentions: list[ObjectSpec] = field(default_factory=list)
    background: str = "solid"

    def has(self, shape: str, colour: str) -> bool:
        """True when the image holds an object of this shape and colour."""
        return any(obj.shape == shape and obj.colour == colour for obj in self.objects)


def sample_rng(seed: int, index: int) -> random.Random:
    """The random source of sample ``index`` of ``seed`` (string seeds are stable across runs)."""
    return random.Random(f"clipsearch-synthetic:{seed}:{index}")


def random_objects(rng: random.Random, two_object_fraction: float = 0.3) -> list[ObjectSpec]:
    """One object (anywhere) or two different objects on opposite sides."""
    if rng.random() >= two_object_fraction:
        return [ObjectSpec(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES), rng.choice(POSITIONS))]
    positions = list(rng.choice(POSITION_PAIRS))
    rng.shuffle(positions)
    first = (rng.choice(SHAPES), rng.choice(list(COLOURS)))
    second = first
    while second == first:
        second = (rng.choice(SHAPES), rng.choice(list(COLOURS)))
    return [
        ObjectSpec(first[0], first[1], rng.choice(SIZES), positions[0]),
        ObjectSpec(second[0], second[1], rng.choice(SIZES), positions[1]),
    ]


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe_object(obj: ObjectSpec, rng: random.Random, say_size: bool, say_position: bool) -> tuple[str, ObjectSpec]:
    """A noun phrase for one object, and what it mentions."""
    words = [rng.choice(SIZE_WORDS[obj.size])] if say_size else []
    shape_word = rng.choice(SHAPE_WORDS[obj.shape])
    if rng.random() < 0.15:
        phrase = with_article(" ".join(words + [shape_word])) + f" that is {obj.colour}"
    else:
        phrase = with_article(" ".join(words + [obj.colour, shape_word]))
    if say_position:
        phrase += " " + rng.choice(POSITION_WORDS[obj.position])
    mention = ObjectSpec(obj.shape, obj.colour, obj.size if say_size else None, obj.position if say_position else None)
    return phrase, mention


def describe(objects: Sequence[ObjectSpec], rng: random.Random) -> tuple[str, list[ObjectSpec]]:
    """A caption from templates with paraphrases, and what it mentions.

    Shape and colour are always named; size and position sometimes.
    """
    say_size = rng.random() < 0.45
    say_position = rng.random() < 0.4
    phrases, mentions = [], []
    for obj in objects:
        phrase, mention = describe_object(obj, rng, say_size, say_position)
        phrases.append(phrase)
        mentions.append(mention)
    if len(phrases) == 1:
        caption = rng.choice(PREFIXES) + phrases[0]
    else:
        joiner = rng.choice((" and ", " and ", " next to ", ", and ")) if not say_position else " and "
        caption = rng.choice(PREFIXES + ("two shapes: ",)) + joiner.join(phrases)
    return caption, mentions


def caption_matches(mentions: Sequence[ObjectSpec], objects: Sequence[ObjectSpec]) -> bool:
    """True when every object the caption names is in the image (None fields match anything)."""

    def fits(mention: ObjectSpec, obj: ObjectSpec) -> bool:
        return all(want is None or want == have for want, have in zip(mention, obj))

    return all(any(fits(mention, obj) for obj in objects) for mention in mentions)


def _muted_colour(rng: random.Random) -> tuple[int, int, int]:
    """A low-saturation mid-tone, so every object colour (white and black too) stands out."""
    grey = rng.randint(95, 165)
    return tuple(max(0, min(255, grey + rng.randint(-22, 22))) for _ in range(3))


def draw_background(kind: str, size: int, rng: random.Random) -> np.ndarray:
    """An HxWx3 float array in [0, 255]."""
    base = np.array(_muted_colour(rng), dtype=np.float32)
    other = np.array(_muted_colour(rng), dtype=np.float32)
    canvas = np.broadcast_to(base, (size, size, 3)).copy()
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        t = (xs * math.cos(angle) + ys * math.sin(angle))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        canvas = base + (other - base) * t[..., None]
    elif kind == "noise":
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(6, 16), (size, size, 1))
        canvas = canvas + noise
    elif kind == "stripes":
        period = rng.randint(max(size // 12, 2), max(size // 5, 3))
        ys, xs = np.mgrid[0:size, 0:size]
        coord = xs if rng.random() < 0.5 else (ys if rng.random() < 0.5 else xs + ys)
        canvas = np.where(((coord // period) % 2 == 0)[..., None], base, other)
    elif kind == "checker":
        period = rng.randint(max(size // 10, 2), max(size // 5, 3))
        ys, xs = np.mgrid[0:size, 0:size]
        canvas = np.where((((xs // period) + (ys // period)) % 2 == 0)[..., None], base, other)
    return np.clip(canvas, 0, 255)


def shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape (not the circle) around (cx, cy), rotated by ``angle`` radians."""
    if shape == "square":
        points = [(math.cos(math.pi / 4 + k * math.pi / 2) * 1.0, math.sin(math.pi / 4 + k * math.pi / 2) * 1.0)
                  for k in range(4)]
        points = [(x * 0.95, y * 0.95) for x, y in points]
    elif shape == "triangle":
        points = [(math.cos(-math.pi / 2 + k * 2 * math.pi / 3), math.sin(-math.pi / 2 + k * 2 * math.pi / 3))
                  for k in range(3)]
        points = [(x * 1.1, y * 1.1 + 0.12) for x, y in points]
    elif shape == "star":
        points = []
        for k in range(10):
            r = 1.1 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            points.append((r * math.cos(a), r * math.sin(a)))
    elif shape == "hexagon":
        points = [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]
    elif shape == "cross":
        a, b = 0.32, 0.95
        points = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                  (-a, -a)]
    else:
        raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in points]


def render(objects: Sequence[ObjectSpec], size: int, rng: random.Random, background: str | None = None) -> Image.Image:
    """Draws the objects over a background (drawn at 2x and downsampled for smooth edges)."""
    background = background or rng.choice(BACKGROUND_KINDS)
    big = size * 2
    canvas = Image.fromarray(draw_background(background, big, rng).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        centre_x, centre_y = POSITION_CENTRES[obj.position]
        cx = (centre_x + rng.uniform(-0.05, 0.05)) * big
        cy = (centre_y + rng.uniform(-0.05, 0.05)) * big
        radius = rng.uniform(*SIZE_RADII[obj.size]) * big
        colour = tuple(max(0, min(255, c + rng.randint(-18, 18))) for c in COLOURS[obj.colour])
        if obj.shape == "circle":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
        else:
            angle = math.radians(rng.uniform(-15, 15))
            draw.polygon(shape_polygon(obj.shape, cx, cy, radius, angle), fill=colour)
    return canvas.resize((size, size), Image.LANCZOS)


def generate_one(seed: int, index: int, size: int = 64, two_object_fraction: float = 0.3) -> Sample:
    rng = sample_rng(seed, index)
    objects = random_objects(rng, two_object_fraction)
    background = rng.choice(BACKGROUND_KINDS)
    caption, mentions = describe(objects, rng)
    image = render(objects, size, rng, background)
    return Sample(image=image, caption=caption, objects=objects, mentions=mentions, background=background)


def generate(n: int, seed: int, size: int = 64, two_object_fraction: float = 0.3) -> list[Sample]:
    """``n`` labelled images of ``size`` x ``size`` pixels, deterministic by ``seed``."""
    return [generate_one(seed, index, size, two_object_fraction) for index in range(n)]


def generate_including(n: int, seed: int, required: Sequence[tuple[str, str]] = (("circle", "red"),),
                       copies: int = 3, size: int = 64) -> list[Sample]:
    """``n`` labelled images in which each required (shape, colour) appears in at least ``copies`` images.

    For end-to-end tests: ``generate_including(40, 5, [("circle", "red")])`` holds three single-object
    images of a red circle (random size, position and background) among random ones, in a seeded order.
    """
    for shape, colour in required:
        if shape not in SHAPES or colour not in COLOURS:
            raise ValueError(f"unknown shape/colour {(shape, colour)}; shapes {SHAPES}, colours {tuple(COLOURS)}")
    forced = len(required) * copies
    if forced > n:
        raise ValueError(f"n={n} is too small for {len(required)} required objects x {copies} copies")
    samples = generate(n - forced, seed, size)
    for number in range(forced):
        shape, colour = required[number // copies]
        rng = sample_rng(seed, -1 - number)
        objects = [ObjectSpec(shape, colour, rng.choice(SIZES), rng.choice(POSITIONS))]
        background = rng.choice(BACKGROUND_KINDS)
        caption, mentions = describe(objects, rng)
        samples.append(Sample(render(objects, size, rng, background), caption, objects, mentions, background))
    random.Random(f"clipsearch-synthetic-order:{seed}").shuffle(samples)
    return samples


def shape_colour_queries(samples: Sequence[Sample]) -> list[tuple[str, list[int]]]:
    """One query per (shape, colour) present: ("a red circle", indexes of the images holding a red circle)."""
    queries = []
    for shape in SHAPES:
        for colour in COLOURS:
            relevant = [i for i, sample in enumerate(samples) if sample.has(shape, colour)]
            if relevant:
                queries.append((f"{with_article(colour)} {shape}", relevant))
    return queries


def image_file_name(index: int, image_format: str = "png") -> str:
    return f"{index:06d}.{'jpg' if image_format.lower() in ('jpg', 'jpeg') else 'png'}"


def write_dataset(folder: str | Path, n: int, seed: int, size: int = 64, image_format: str = "png") -> Path:
    """Writes ``n`` samples into ``folder``:

    - ``images/000000.png`` ... (or ``.jpg`` with ``image_format="jpeg"``);
    - ``captions.json``: COCO-style ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``;
    - ``queries.jsonl``: one ``{"query": "a red circle", "relevant": [file names]}`` per shape+colour present;
    - ``labels.jsonl``: every image's objects (shape, colour, size, position), for inspection.
    """
    folder = Path(folder)
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    samples = generate(n, seed, size)
    names = [image_file_name(i, image_format) for i in range(n)]
    for name, sample in zip(names, samples):
        if name.endswith(".jpg"):
            sample.image.save(image_dir / name, quality=92)
        else:
            sample.image.save(image_dir / name)
    captions = {
        "info": {"description": f"clipsearch synthetic shapes, seed {seed}, {n} images of {size}px"},
        "images": [{"id": i, "file_name": name} for i, name in enumerate(names)],
        "annotations": [{"id": i, "image_id": i, "caption": s.caption} for i, s in enumerate(samples)],
    }
    (folder / "captions.json").write_text(json.dumps(captions, indent=1))
    with open(folder / "queries.jsonl", "w") as out:
        for text, relevant in shape_colour_queries(samples):
            out.write(json.dumps({"query": text, "relevant": [names[i] for i in relevant]}) + "\n")
    with open(folder / "labels.jsonl", "w") as out:
        for name, sample in zip(names, samples):
            record = {"file_name": name, "caption": sample.caption, "background": sample.background,
                      "objects": [obj._asdict() for obj in sample.objects]}
            out.write(json.dumps(record) + "\n")
    return folder
