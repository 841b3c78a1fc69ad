"""Generated survey imagery with exact ground truth: no dataset can be downloaded here, so
tests, the demo and the benchmarks make their own.

`survey_scene`: a frame of animals on textured ground (dense: every tile has some), for
tests of mechanics. `survey_pool`: imagery as aerial surveys really are (Tanzania's are
>= 95% empty tiles): most 320 px tiles empty, animals in herds, one species rare (a few
percent of the animals), and look-alikes drawn as animals are but never labelled (rocks,
termite mounds, bushes, with their shadows, in the animals' size and colour range), on three
biomes with different grounds and species: `savanna` (elephant, zebra, rare bird), `steppe`
(saiga, horse, rare wolf) and `wetland` (buffalo, hippo, rare wattled crane). Each species
has its own body shape and colour. The two new surveys stand for the two transfers a team
meets. The wetland's animals are drawn in the savanna's tones (grey bulks, a pale small
bird) at their own sizes and shades, so last season's savanna model sees them as animals and
only has to learn their names: savanna-v1 finds most of them before any training. The
steppe's are drawn in the look-alikes' tones (browns like termite mounds, a grey like rocks),
which the savanna model learnt to ignore: it finds almost none of them, and a new head must
learn them nearly from scratch.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("elephant", "zebra", "bird")

# (body colour RGB, (min, max) body length in px, length / width ratio)
_LOOKS = {
    "elephant": ((128, 128, 136), (40, 60), 1.5),
    "zebra": ((238, 238, 232), (26, 38), 2.2),
    "bird": ((196, 40, 36), (16, 22), 1.0),
    "saiga": ((172, 130, 82), (22, 30), 1.8),
    "horse": ((96, 62, 40), (32, 44), 2.1),
    "wolf": ((150, 146, 140), (20, 28), 2.6),
    "buffalo": ((70, 68, 78), (36, 50), 1.6),
    "hippo": ((118, 92, 108), (44, 60), 1.7),
    "wattled crane": ((242, 242, 238), (16, 22), 1.2),
}
# Look-alikes, never labelled: (colour, (min, max) size in px, length / width ratio)
_CONFUSERS = {
    "rock": ((126, 124, 122), (20, 50), 1.3),
    "termite mound": ((150, 92, 62), (24, 40), 1.1),
    "bush": ((52, 78, 40), (22, 46), 1.2),
}


@dataclass(frozen=True)
class Biome:
    """A survey's ground (two colours mixed in patches), its species (the last rare) and the
    look-alikes found there."""

    soil: tuple[int, int, int]
    vegetation: tuple[int, int, int]
    species: tuple[str, ...]
    look_alikes: tuple[str, ...] = tuple(_CONFUSERS)


BIOMES = {
    "savanna": Biome((150, 120, 80), (110, 130, 60), ("elephant", "zebra", "bird")),
    "steppe": Biome((196, 186, 150), (160, 156, 112), ("saiga", "horse", "wolf")),
    # a floodplain: termite mounds and bushes, no rocks
    "wetland": Biome((118, 128, 84), (78, 108, 62), ("buffalo", "hippo", "wattled crane"),
                     ("termite mound", "bush")),
}


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (K, 4) float32 x0 y0 x1 y1
    classes: np.ndarray  # (K,) int64 index into CLASSES


def ground(rng: np.random.Generator, height: int, width: int,
           biome: Biome = BIOMES["savanna"]) -> Image.Image:
    """Smooth patches of soil and vegetation plus fine grain."""
    coarse = rng.uniform(0, 1, size=(max(2, height // 64), max(2, width // 64), 1))
    soil = np.array(biome.soil) * (1 - coarse) + np.array(biome.vegetation) * coarse
    base = Image.fromarray(soil.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.normal(0, 10, size=(height, width, 1))
    pixels = np.asarray(base, dtype=np.float64) + grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(0.6)
    )


def survey_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    animals: int,
    classes: tuple[str, ...] = CLASSES,
    frequencies: Sequence[float] | None = None,
) -> Scene:
    """A scene with about `animals` non-overlapping animals (fewer if space runs out), of
    classes drawn uniformly or with the given relative `frequencies` (rare species)."""
    image = ground(rng, height, width)
    draw = ImageDraw.Draw(image)
    boxes: list[list[float]] = []
    labels: list[int] = []
    for _ in range(animals * 20):
        if len(boxes) == animals:
            break
        cls = (int(rng.integers(len(classes))) if frequencies is None
               else int(rng.choice(len(classes), p=np.asarray(frequencies) / sum(frequencies))))
        box = _place(draw, rng, boxes, classes[cls], _LOOKS[classes[cls]], (0, 0, width, height))
        if box is not None:
            boxes.append(box)
            labels.append(cls)
    return _scene(image, boxes, labels)


def _scene(image: Image.Image, boxes: list[list[float]], labels: list[int]) -> Scene:
    return Scene(np.asarray(image).copy(), np.array(boxes, dtype=np.float32).reshape(-1, 4),
                 np.array(labels, dtype=np.int64))


def _place(draw: ImageDraw.ImageDraw, rng: np.random.Generator, taken: list[list[float]],
           kind: str, look: tuple[tuple[int, int, int], tuple[int, int], float],
           area: tuple[float, float, float, float]) -> list[float] | None:
    """Draw one body (with its shadow) inside `area` clear of `taken`; its box including the
    shadow, or None when it did not fit."""
    colour, (low, high), ratio = look
    length = float(rng.uniform(low, high))
    w, h = (length, length / ratio) if rng.random() < 0.5 else (length / ratio, length)
    left, top, right, bottom = area
    if right - left < w + 4 or bottom - top < h + 4:
        return None
    x0 = float(rng.uniform(left + 2, right - w - 2))
    y0 = float(rng.uniform(top + 2, bottom - h - 2))
    box = [x0, y0, x0 + w + 2, y0 + h + 3]  # the box includes the shadow
    if any(_overlaps(box, other, margin=4) for other in taken):
        return None
    shade = tuple(int(c + rng.integers(-12, 13)) for c in colour)
    draw.ellipse([x0 + 2, y0 + 3, x0 + w + 2, y0 + h + 3], fill=(60, 55, 40))  # shadow
    if kind == "bush":  # a few overlapping crowns
        for _ in range(3):
            dx, dy = rng.uniform(-0.2, 0.2, 2) * (w, h)
            draw.ellipse([x0 + dx, y0 + dy, x0 + w * 0.8 + dx, y0 + h * 0.8 + dy], fill=shade)
    else:
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=shade)
    if kind == "zebra":
        _stripes(draw, [x0, y0, x0 + w, y0 + h], w > h)
    return box


@dataclass(frozen=True)
class PoolSettings:
    """A generated survey. `empty_fraction` is the share of 320 px tiles (the loop's recipe,
    overlap 0.2) holding no animal across the pool; herds and confusers per image as given."""

    biome: str = "savanna"
    height: int = 480
    width: int = 640
    empty_fraction: float = 0.92
    rare_share: float = 0.05  # of the animals, the biome's last species
    herd: tuple[int, int] = (3, 9)  # common species' herd sizes; the rare one 1-3
    spread: float = 28.0  # px, a herd's scatter around its centre
    confusers: float = 2.0  # look-alikes per image, on average


def _tiles_per_herd(settings: PoolSettings) -> float:
    """The loop's 320 px tiles a herd touches on average, in a frame of this size: what turns
    an empty-tile share into the share of frames with a herd. A herd reaches about 1.5 ×
    `spread` from its centre; to a tenth (3.0 for a 640 × 480 frame, as measured on
    generated pools; 1.0 for a frame that is one tile)."""
    crops = _tile_plan(settings.height, settings.width).crops
    reach = 1.5 * settings.spread
    xs, ys = np.meshgrid(np.linspace(40, settings.width - 40, 200),
                         np.linspace(40, settings.height - 40, 200))
    touched = sum(((xs >= t.x0 - reach) & (xs < t.x1 + reach) & (ys >= t.y0 - reach)
                   & (ys < t.y1 + reach)).mean() for t in crops)
    return round(float(touched), 1)


def survey_pool(rng: np.random.Generator, count: int, settings: PoolSettings = PoolSettings()
                ) -> list[Scene]:
    """`count` survey frames; classes index the biome's species."""
    biome = BIOMES[settings.biome]
    tiles = len(_tile_plan(settings.height, settings.width).crops)
    with_herd = min(1.0, (1 - settings.empty_fraction) * tiles / _tiles_per_herd(settings))
    common, rare = settings.herd, (1, 3)
    mean_common, mean_rare = sum(common) / 2, sum(rare) / 2
    # herds of the rare species are this likely for it to be `rare_share` of the animals
    rare_herd = (settings.rare_share * mean_common
                 / (mean_rare - settings.rare_share * (mean_rare - mean_common)))
    return [_frame(rng, settings, biome, with_herd, rare_herd) for _ in range(count)]


def _frame(rng: np.random.Generator, settings: PoolSettings, biome: Biome, with_herd: float,
           rare_herd: float) -> Scene:
    image = ground(rng, settings.height, settings.width, biome)
    draw = ImageDraw.Draw(image)
    boxes: list[list[float]] = []
    labels: list[int] = []
    if rng.random() < with_herd:
        is_rare = rng.random() < rare_herd
        cls = len(biome.species) - 1 if is_rare else int(rng.integers(len(biome.species) - 1))
        low, high = (1, 3) if is_rare else settings.herd
        size = int(rng.integers(low, high + 1))
        cx, cy = rng.uniform(40, settings.width - 40), rng.uniform(40, settings.height - 40)
        r = settings.spread * (1 + size / 4)
        area = (max(0, cx - r), max(0, cy - r), min(settings.width, cx + r),
                min(settings.height, cy + r))
        for _ in range(size * 30):
            if len(boxes) == size:
                break
            species = biome.species[cls]
            box = _place(draw, rng, boxes, species, _LOOKS[species], area)
            if box is not None:
                boxes.append(box)
                labels.append(cls)
    taken = list(boxes)
    for _ in range(int(rng.poisson(settings.confusers))):
        kind = str(rng.choice(list(biome.look_alikes)))
        box = _place(draw, rng, taken, kind, _CONFUSERS[kind],
                     (0, 0, settings.width, settings.height))
        if box is not None:
            taken.append(box)
    return _scene(image, boxes, labels)


def _tile_plan(height: int, width: int):
    from .detection.tiling import TilePlan, TilingOptions

    return TilePlan.for_image(height, width, TilingOptions(tile_size=320, overlap=0.2))


def empty_tile_share(scenes: Sequence[Scene]) -> float:
    """The share of the loop's 320 px tiles whose area holds no animal's centre."""
    empty = total = 0
    for scene in scenes:
        centres = (scene.boxes[:, :2] + scene.boxes[:, 2:]) / 2
        for t in _tile_plan(*scene.image.shape[:2]).crops:
            inside = ((centres[:, 0] >= t.x0) & (centres[:, 0] < t.x1)
                      & (centres[:, 1] >= t.y0) & (centres[:, 1] < t.y1))
            empty += not inside.any()
            total += 1
    return empty / max(total, 1)


def _overlaps(a: list[float], b: list[float], margin: float) -> bool:
    return (
        a[0] < b[2] + margin
        and b[0] < a[2] + margin
        and a[1] < b[3] + margin
        and b[1] < a[3] + margin
    )


def _stripes(draw: ImageDraw.ImageDraw, box: list[float], horizontal: bool) -> None:
    x0, y0, x1, y1 = box
    steps = np.linspace(x0 + 2, x1 - 2, 5) if horizontal else np.linspace(y0 + 2, y1 - 2, 5)
    for s in steps:
        line = [s, y0 + 1, s, y1 - 1] if horizontal else [x0 + 1, s, x1 - 1, s]
        draw.line(line, fill=(20, 20, 20), width=2)


def label_config(classes: Sequence[str] = CLASSES) -> str:
    """A Label Studio project for generated scenes: boxes labelled with their classes."""
    return ("<View><Image name='image' value='$image'/><RectangleLabels name='label' "
            "toName='image'>" + "".join(f"<Label value='{c}'/>" for c in classes)
            + "</RectangleLabels></View>")


LABEL_CONFIG = label_config()


def coco_of(scenes: Sequence[tuple[str, np.ndarray, np.ndarray, tuple[int, int]]],
            classes: Sequence[str] = CLASSES) -> dict[str, Any]:
    """A COCO detection dataset of generated scenes, given as (file name, boxes (x0, y0, x1,
    y1), classes, (height, width)); image ids are positions, categories `classes`."""
    coco: dict[str, Any] = {"images": [], "annotations": [],
                            "categories": [{"id": i, "name": n} for i, n in enumerate(classes)]}
    for i, (name, boxes, classes, (height, width)) in enumerate(scenes):
        coco["images"].append({"id": i, "file_name": name, "width": width, "height": height})
        for box, cls in zip(boxes.tolist(), classes.tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i,
                                        "category_id": cls, "bbox": [box[0], box[1], w, h],
                                        "area": w * h, "iscrowd": 0})
    return coco


def png_bytes(image: np.ndarray) -> bytes:
    """An image as the bytes of a PNG file, to upload to Label Studio as a user would."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
