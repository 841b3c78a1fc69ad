"""Generated surveys as surveys are (backend/synthetic.py): mostly empty tiles, herds, a
rare species, look-alikes that are never labelled, three biomes with their own species."""

from __future__ import annotations

import numpy as np

from backend.synthetic import BIOMES, PoolSettings, empty_tile_share, survey_pool


def _pool(biome: str, count: int = 120, **settings) -> list:
    return survey_pool(np.random.default_rng(0), count, PoolSettings(biome=biome, **settings))


def test_a_survey_pool_is_mostly_empty_tiles_with_animals_in_herds():
    pool = _pool("savanna")
    assert empty_tile_share(pool) >= 0.9
    herds = [f for f in pool if len(f.classes)]
    assert 0 < len(herds) < 0.3 * len(pool)
    # a herd is one species, close together: its boxes span far less than the frame
    for frame in herds:
        assert len(set(frame.classes.tolist())) == 1
        span = frame.boxes[:, 2:].max(0) - frame.boxes[:, :2].min(0)
        assert (span < [400, 300]).all()


def test_the_empty_share_holds_for_frames_of_any_size():
    """A pool of single tiles (what an annotator opens when a survey is cut into tiles) is
    as empty as asked, not emptier because a herd spans fewer of its tiles."""
    for size, share, count in (((320, 320), 0.92, 300), ((320, 320), 0.8, 300),
                               ((1000, 1500), 0.92, 40)):
        pool = _pool("steppe", count, height=size[0], width=size[1], empty_fraction=share)
        assert abs(empty_tile_share(pool) - share) < 0.03


def test_the_rare_species_is_a_few_percent_of_the_animals():
    classes = np.concatenate([f.classes for f in _pool("steppe", 250)])
    rare = float((classes == len(BIOMES["steppe"].species) - 1).mean())
    assert 0.0 < rare <= 0.1
    assert float((np.concatenate([f.classes for f in _pool("steppe", 100, rare_share=0.0)])
                  == 2).mean()) == 0.0


def test_look_alikes_are_drawn_but_never_labelled():
    """Frames without animals still hold bodies with shadows: the ground alone is smooth."""
    empty = [f for f in _pool("savanna", 60) if not len(f.classes)]
    bare = [f for f in _pool("savanna", 60, confusers=0.0) if not len(f.classes)]
    shadow = np.array([60, 55, 40])

    def shadowed(frame) -> int:
        return int((np.abs(frame.image.astype(int) - shadow).sum(-1) < 12).sum())

    assert np.mean([shadowed(f) > 50 for f in empty]) > 0.6
    assert max(shadowed(f) for f in bare) < 50


def test_the_biomes_differ_in_ground_and_species():
    pools = {name: _pool(name, 40) for name in BIOMES}
    species = [set(biome.species) for biome in BIOMES.values()]
    assert len(set().union(*species)) == sum(map(len, species)) == 9
    colour = {n: np.mean([f.image.mean((0, 1)) for f in p], 0) for n, p in pools.items()}
    for a, b in (("savanna", "steppe"), ("savanna", "wetland"), ("steppe", "wetland")):
        assert np.abs(colour[a] - colour[b]).sum() > 30
    savanna = pools["savanna"]
    again = _pool("savanna", 40)
    assert all((a.image == b.image).all() for a, b in zip(savanna, again, strict=True))


def test_last_seasons_model_sees_the_wetlands_animals_and_not_the_steppes():
    """The two transfers the biomes stand for: savanna-v1, before any training, boxes most
    of the wetland's animals (drawn in the savanna's tones) and almost none of the steppe's
    (drawn in the look-alikes' tones), whatever it calls them."""
    from backend.effort import iou_matrix
    from backend.model_dir import ModelDir
    from backend.models import SAVANNA_V1

    model = ModelDir.open(SAVANNA_V1)
    predictor = model.predictor(device="cpu")

    def found(biome: str) -> float:
        tiles = _pool(biome, 8, height=320, width=320, empty_fraction=0.0)
        hits = 0
        for tile in tiles:
            boxes = predictor.detect(tile.image, model.recipe).boxes.numpy()
            hits += int((iou_matrix(tile.boxes, boxes).max(1, initial=0) >= 0.5).sum())
        return hits / sum(len(t.boxes) for t in tiles)

    assert found("wetland") > 0.7
    assert found("steppe") < 0.2


def test_each_biome_draws_its_own_look_alikes():
    """A floodplain has termite mounds and bushes, no rocks: the savanna's empty frames hold
    rock-grey blobs, the wetland's none."""

    def rock_grey(biome: str) -> int:
        frames = [f for f in _pool(biome, 40, empty_fraction=1.0, confusers=3.0)]
        pixels = np.concatenate([f.image.reshape(-1, 3) for f in frames]).astype(int)
        grey = (np.ptp(pixels, axis=1) < 16) & (pixels.min(1) > 108) & (pixels.max(1) < 142)
        return int(grey.sum())

    assert "rock" not in BIOMES["wetland"].look_alikes
    assert rock_grey("savanna") > 2000
    assert rock_grey("wetland") < 200
