"""`tridentloop bench --pretrain-source DIR`: "last season's model", a stand-in for the
pretrained model a real team starts from (the detectron2 model zoo, or their previous
survey's registry): the tiny TridentNet trained from scratch on a generated savanna survey
(elephant, zebra, a rare bird; half its frames hold a herd). It knows what an animal from
the air looks like, not the steppe's species. The shipped copy (`backend/models/savanna-v1`)
was built by exactly this procedure; its weights' SHA-256 is pinned (backend/models), and a
rebuild says whether it reproduces it (torch on the CPU, 2 threads, the same machine kind).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..detection.config import bundled_config, dump_config, load_config
from ..detection.model import GeneralizedRCNN
from ..detection.tiling import TilingOptions
from ..detection.training import Sample, TrainOptions, init_from_scratch, train
from ..files import file_sha256
from ..model_dir import ModelDir, write_model_dir
from ..models import SAVANNA_V1_SHA256
from ..recipe import recipe_json
from ..synthetic import BIOMES, PoolSettings, survey_pool


@dataclass(frozen=True)
class SourceRecipe:
    biome: str = "savanna"
    frames: int = 300  # generated; those holding animals are trained on
    empty_fraction: float = 0.5
    iterations: int = 600
    batch_size: int = 4
    lr: float = 0.02
    warmup_iters: int = 50
    seed: int = 0
    threads: int = 2


def build_source_model(out: Path, recipe: SourceRecipe = SourceRecipe()) -> ModelDir:
    """Train the source model and write it as a model directory (tiled 320 px recipe)."""
    torch.set_num_threads(recipe.threads)
    rng = np.random.default_rng(recipe.seed)
    frames = survey_pool(rng, recipe.frames, PoolSettings(biome=recipe.biome,
                                                          empty_fraction=recipe.empty_fraction))
    samples = [Sample(f.image, f.boxes, f.classes) for f in frames if len(f.classes)]
    config = bundled_config("tiny_tridentnet")
    torch.manual_seed(recipe.seed)
    model = GeneralizedRCNN(load_config(config))
    init_from_scratch(model)
    train(model, samples, TrainOptions(iterations=recipe.iterations,
                                       batch_size=recipe.batch_size, lr=recipe.lr,
                                       warmup_iters=recipe.warmup_iters, workers=0,
                                       seed=recipe.seed))
    return write_source_model(out, model.state_dict(), recipe, len(samples))


def write_source_model(out: Path, state_dict: dict[str, torch.Tensor], recipe: SourceRecipe,
                       frames: int) -> ModelDir:
    return write_model_dir(out, dump_config(bundled_config("tiny_tridentnet")),
                           {k: v.cpu() for k, v in state_dict.items()},
                           list(BIOMES[recipe.biome].species),
                           {"version": "savanna-v1", "iterations": recipe.iterations,
                            "recipe": recipe_json(TilingOptions(tile_size=320, overlap=0.2)),
                            "built_by": "tridentloop bench --pretrain-source",
                            "source_recipe": recipe.__dict__,
                            "trained_on": f"{frames} generated {recipe.biome} frames"})


def run_source_model_build(out: Path) -> Iterator[dict]:
    started = time.perf_counter()
    model = build_source_model(out)
    digest = file_sha256(model.weights)
    yield {"model": str(out), "sha256": digest, "pinned": SAVANNA_V1_SHA256,
           "reproduces_shipped": digest == SAVANNA_V1_SHA256,
           "seconds": round(time.perf_counter() - started, 1)}
