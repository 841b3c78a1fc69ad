"""Generated surveys as surveys are (backend/synthetic.py): mostly empty tiles, herds, a
rare species, look-alikes that are never labelled, two biomes with their own species."""

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


def test_the_two_biomes_differ_in_ground_and_species():
    savanna, steppe = _pool("savanna", 40), _pool("steppe", 40)
    assert set(BIOMES["savanna"].species).isdisjoint(BIOMES["steppe"].species)
    colour = [np.mean([f.image.mean((0, 1)) for f in p], 0) for p in (savanna, steppe)]
    assert np.abs(colour[0] - colour[1]).sum() > 60
    again = _pool("savanna", 40)
    assert all((a.image == b.image).all() for a, b in zip(savanna, again, strict=True))
