"""How a model must be run: its *inference recipe*, stored in the model directory's
`model.json` and written by the loop's `train` stage from params.yaml's `recipe` section.

Two recipes exist. `whole`: each image as detectron2's DefaultPredictor runs it (resized to
INPUT.MIN_SIZE_TEST/MAX_SIZE_TEST), what a model trained on whole photos needs. `tiled`:
native-resolution tiles of the size the model was trained on, merged across tiles, what a
survey model needs. A model directory without a recipe (detectron2 files brought as they
are) runs whole, as its authors ran it, unless the user asks for tiles.

A recipe is the tiling half of `TilingOptions` (None for whole); tiles per forward pass are
a property of the device, not of the model, and stay a run-time setting.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .detection.tiling import TilingOptions

log = logging.getLogger(__name__)

Recipe = TilingOptions | None
"""None: the whole image, exactly as DefaultPredictor; else tiles at native resolution."""

# model.json / params.yaml key -> TilingOptions field
_TILED_KEYS = {
    "tile_size": "tile_size",
    "overlap": "overlap",
    "merge": "merge",
    "merge_metric": "metric",
    "merge_threshold": "threshold",
    "full_image_pass": "full_image_pass",
    "views": "views",
}


class RecipeError(ValueError):
    """A recipe that names an unknown mode or key, or a value out of range."""


def parse_recipe(data: Mapping[str, Any] | None, where: str) -> Recipe:
    """The recipe stored at `where` (model.json, params.yaml); None or {} is `whole`."""
    if not data:
        return None
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: recipe must be a mapping, not {data!r}")
    mode = data.get("mode", "whole")
    extra = set(data) - {"mode", *_TILED_KEYS}
    if mode not in ("whole", "tiled") or extra:
        raise RecipeError(
            f"{where}: recipe mode must be whole or tiled (got {mode!r}) with keys from "
            f"{sorted(_TILED_KEYS)}" + (f"; unknown: {sorted(extra)}" if extra else "")
        )
    if mode == "whole":
        if data.get("views", 1) != 1:
            raise RecipeError(f"{where}: recipe views {data['views']!r} needs mode tiled (a "
                              "whole-image recipe runs each image once, as DefaultPredictor)")
        return None
    fields = {field: data[key] for key, field in _TILED_KEYS.items() if key in data}
    try:
        return TilingOptions(**fields)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{where}: {exc}") from exc


def recipe_json(recipe: Recipe) -> dict[str, Any]:
    """The form stored in model.json: every value explicit, so a later change of a default
    cannot change how an existing model runs."""
    if recipe is None:
        return {"mode": "whole"}
    return {"mode": "tiled"} | {key: getattr(recipe, f) for key, f in _TILED_KEYS.items()}


def describe(recipe: Recipe) -> str:
    if recipe is None:
        return "whole image (DefaultPredictor: resized to INPUT.MIN_SIZE_TEST/MAX_SIZE_TEST)"
    text = (f"tiled {recipe.tile_size} px, overlap {recipe.overlap}, merge {recipe.merge} "
            f"by {recipe.metric} >= {recipe.threshold}")
    text += ", plus a whole-image pass" if recipe.full_image_pass else ""
    return text + (f", {recipe.views} mirrored views fused" if recipe.views > 1 else "")


@dataclass(frozen=True)
class RecipeOverrides:
    """What the command line says about running a model; None leaves the model's recipe."""

    whole: bool = False
    tile_size: int | None = None
    overlap: float | None = None
    merge: str | None = None
    metric: str | None = None
    threshold: float | None = None
    full_image_pass: bool | None = None
    batch_size: int | None = None  # a run-time setting, never part of a recipe

    def _tiling_flags(self) -> dict[str, Any]:
        names = ("tile_size", "overlap", "merge", "metric", "threshold", "full_image_pass")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def apply(self, recipe: Recipe, model: str) -> TilingOptions | None:
        """How to run `model` this time: its recipe with the flags laid over it, each change
        logged. Tiling flags on a whole-image model need --tile-size, so that a typo in an
        option cannot silently turn a DefaultPredictor model into a tiled one."""
        flags = self._tiling_flags()
        if self.whole:
            if flags:
                raise RecipeError("--no-tiling goes with no other tiling option "
                                  f"(got {sorted(flags)})")
            chosen: Recipe = None
        elif recipe is None and flags and "tile_size" not in flags:
            raise RecipeError(
                f"model {model} runs whole images (its recipe); give --tile-size to tile it "
                f"with {sorted(flags)}"
            )
        elif flags:
            chosen = dataclasses.replace(recipe or TilingOptions(), **flags)
        else:
            chosen = recipe
        if chosen != recipe:
            log.warning("model %s: the command line overrides its recipe (%s) with: %s",
                        model, describe(recipe), describe(chosen))
        else:
            log.info("model %s runs by its recipe: %s", model, describe(recipe))
        if chosen is not None and self.batch_size is not None:
            chosen = dataclasses.replace(chosen, batch_size=self.batch_size)
        return chosen
