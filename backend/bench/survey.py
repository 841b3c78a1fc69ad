"""What a measured rate means for a whole survey: hours and money on one device."""

from __future__ import annotations


def survey_cost(
    tiles_per_s: float, images: int, tiles_per_image: int, price_per_hour: float
) -> dict[str, float]:
    """Hours and money to pre-label `images` x `tiles_per_image` tiles at a measured rate."""
    hours = images * tiles_per_image / tiles_per_s / 3600
    return {
        "images": images,
        "tiles_per_image": tiles_per_image,
        "hours": round(hours, 2),
        "cost": round(hours * price_per_hour, 2),
        "price_per_hour": price_per_hour,
    }
