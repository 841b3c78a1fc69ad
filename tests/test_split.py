"""The train/val split: pinned tasks stay where Label Studio pins them; the rest go by a
hash of the task id, stable as the project grows."""

from __future__ import annotations

from pipelines.split import assign, is_val


def _images(n: int, pins: dict[int, str]) -> list[dict]:
    return [{"id": i, **({"split": pins[i]} if i in pins else {})} for i in range(1, n + 1)]


def test_pinned_tasks_go_where_they_are_pinned_and_the_rest_by_hash():
    hashed_val = [i for i in range(1, 201) if is_val(i, 25, 0)]
    hashed_train = [i for i in range(1, 201) if not is_val(i, 25, 0)]
    pins = {hashed_train[0]: "val", hashed_val[0]: "train", hashed_train[1]: "val"}
    train, val, unknown = assign(_images(200, pins), 25, 0)
    assert {hashed_train[0], hashed_train[1]} <= val and hashed_val[0] in train
    unpinned = set(range(1, 201)) - set(pins)
    assert val & unpinned == {i for i in unpinned if is_val(i, 25, 0)}
    assert train | val == set(range(1, 201)) and not train & val and not unknown


def test_a_holdout_stays_fixed_as_the_project_grows():
    holdout = {i: "val" for i in range(1, 11)}  # one camera station, pinned
    _, before, _ = assign(_images(50, holdout), 20, 0)
    _, after, _ = assign(_images(500, holdout), 20, 0)
    assert set(holdout) <= before and before <= after  # nothing old moves


def test_unknown_pin_values_are_reported_and_split_by_hash():
    _, val, unknown = assign(_images(20, {3: "holdout", 4: "holdout", 5: "test"}), 25, 0)
    assert unknown == {"holdout": 2, "test": 1}
    assert (3 in val) == is_val(3, 25, 0)


def test_val_percent_zero_validates_on_the_pinned_tasks_alone(tmp_path, monkeypatch, capsys):
    """The pinning trap: pins leave the hash on for the other tasks (and the stage says
    so); val_percent 0 keeps val to the pinned holdout."""
    import json

    import yaml

    from pipelines import split

    holdout = {i: "val" for i in range(1, 6)}
    _, val, _ = assign(_images(100, holdout), 0, 0)
    assert val == set(holdout)
    dataset = tmp_path / "data/dataset"
    dataset.mkdir(parents=True)
    (dataset / "annotations.json").write_text(json.dumps(
        {"images": _images(100, holdout), "annotations": [], "categories": []}))
    params = tmp_path / "params.yaml"
    monkeypatch.chdir(tmp_path)
    for percent, note in ((25, True), (0, False)):
        params.write_text(yaml.safe_dump({"split": {"val_percent": percent, "dir": "s"}}))
        monkeypatch.setenv("TRIDENTLOOP_PARAMS", str(params))
        split.main()
        out = capsys.readouterr().out
        assert "5 pinned to val" in out
        assert ("set split.val_percent: 0" in out) == note
