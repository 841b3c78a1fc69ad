"""The model registry: versions, an atomic `current` pointer, history and rollback."""

from __future__ import annotations

import pytest

from backend.cli import main
from backend.registry import Registry, RegistryError

from .servers import make_model_dir


@pytest.fixture
def registry(tmp_path):
    registry = Registry(tmp_path / "registry")
    for version in ("v0001", "v0002", "v0003"):
        registry.add(make_model_dir(tmp_path / version, version=version))
    return registry


def test_new_registry_has_no_current_version(registry):
    assert registry.version_names() == ["v0001", "v0002", "v0003"]
    assert registry.current_name() is None
    with pytest.raises(RegistryError, match="no current version"):
        registry.current()


def test_switch_moves_the_pointer_and_changes_its_stamp(registry):
    registry.switch("v0001")
    stamp = registry.pointer_stamp()
    registry.switch("v0002")
    assert registry.current().version == "v0002"
    assert registry.pointer_stamp() != stamp
    assert not list(registry.root.glob(".current*"))  # no temp file left behind


def test_rollback_returns_to_the_previous_version(registry, capsys):
    for version in ("v0001", "v0002", "v0003"):
        registry.switch(version)
    assert registry.rollback() == "v0002"
    assert main(["rollback", "--registry", str(registry.root)]) == 0
    assert "rolled back from v0002 to v0001" in capsys.readouterr().out
    assert [e["reason"] for e in registry.history()][-2:] == ["rollback", "rollback"]


def test_rollback_without_history_is_a_clear_error(registry):
    registry.switch("v0001")
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback()


def test_unknown_or_duplicate_versions_are_refused(registry, tmp_path):
    with pytest.raises(RegistryError, match="no version 'v9'"):
        registry.switch("v9")
    with pytest.raises(RegistryError, match="already exists"):
        registry.add(make_model_dir(tmp_path / "again", version="v0001"))


def test_incomplete_version_cannot_become_current(registry):
    (registry.versions_dir / "v0002" / "model_final.pth").unlink()
    with pytest.raises(RegistryError, match=r"cannot be served: .* has no model_final\.pth"):
        registry.switch("v0002")
    assert registry.current_name() is None


def test_describe_marks_the_current_version(registry):
    registry.switch("v0003")
    described = {d["version"]: d["current"] for d in registry.describe()}
    assert described == {"v0001": False, "v0002": False, "v0003": True}
