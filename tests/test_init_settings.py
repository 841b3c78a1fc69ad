"""`tridentloop init --set`: a setting the shipped params.yaml does not have, or a value not
of its default's type, is refused before anything is made, with the nearest name."""

from __future__ import annotations

import pytest

from backend.cli import main


@pytest.mark.parametrize(("setting", "said"), [
    ("train.iteration=5", "params.yaml's train has no setting 'iteration'; did you mean "
                          "'iterations'?"),
    ("trian.iterations=5", "params.yaml has no section 'trian'; did you mean 'train'?"),
    ("train.iterations=abc", "train.iterations='abc': expected a int like its default 150"),
    ("train.lr=fast", "expected a float like its default 0.01"),
    ("select.create_view=3", "expected a bool like its default True"),
])
def test_a_wrong_setting_is_refused_with_the_fix(tmp_path, capsys, setting, said):
    assert main(["init", str(tmp_path / "loop"), "--project", "3", "--set", setting]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "loop").exists()


def test_settings_of_the_default_s_type_or_auto_s_union_pass_the_check():
    from pipelines.workspace import check_settings

    check_settings({"train": {"iterations": 5, "lr": 1, "base_weights": "detectron2://x"},
                    "evaluate": {"max_detections": 500}, "deploy": {"max_effort_ratio": 1}})
