"""Export turns accepted Label Studio regions into training boxes and says what it leaves out."""

from __future__ import annotations

from pipelines.export import boxes_of


def _rect(label: str, rotation: float = 0.0, from_name: str = "label", width: float = 10.0):
    return {"type": "rectanglelabels", "from_name": from_name, "to_name": "image",
            "value": {"x": 10.0, "y": 20.0, "width": width, "height": 5.0,
                      "rotation": rotation, "rectanglelabels": [label]}}


def test_every_region_left_out_is_counted_by_why():
    annotation = {"result": [
        _rect("zebra"), _rect("zebra"), _rect("gnu"),
        _rect("unicorn"),                     # not a label of the config (renamed, say)
        _rect("zebra", rotation=30),          # a rotated box cannot be an axis-aligned one
        _rect("zebra", from_name="other"),    # another control's rectangles
        _rect("zebra", width=0.0),
        {"type": "choices", "from_name": "quality", "value": {"choices": ["blurry"]}},
    ]}
    boxes, dropped = boxes_of(annotation, "label", {"zebra": 0, "gnu": 1}, 200, 100)
    assert [b["category_id"] for b in boxes] == [0, 0, 1]
    assert boxes[0]["bbox"] == [20.0, 20.0, 20.0, 5.0]  # percent of 200 x 100 -> pixels
    assert dropped == {"label not in the config (unicorn)": 1, "rotated box": 1,
                       "other control (other)": 1, "empty box": 1,
                       "not a rectangle (choices)": 1}
