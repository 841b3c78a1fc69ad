"""Every stage and command that talks to Label Studio says in one line what is wrong and what
to do: a refused token, a project that does not exist, a server that is not there (retried
for the time allowed, then named by its URL). A real Label Studio answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from backend.cli import main as cli
from backend.ports import free_port
from pipelines import export, select

from .servers import make_model_dir

pytestmark = pytest.mark.slow

LINE_LIMIT = 400  # one readable line, not a dump of response headers


@pytest.fixture
def stage_dir(tmp_path, monkeypatch, label_studio):
    """A folder a stage runs in, its params.yaml naming the server's project 1."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)

    def write(project: int, retry_for: float = 120) -> Path:
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(
            {"labelstudio": {"project": project, "retry_for": retry_for}}))
        return tmp_path
    return write


def stage_error(stage) -> str:
    with pytest.raises(SystemExit) as ended:
        stage.main()
    message = str(ended.value)
    assert "\n" not in message and len(message) < LINE_LIMIT, message
    return message


def test_a_refused_token_names_the_token_kinds_that_work(stage_dir, monkeypatch):
    stage_dir(1)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    message = stage_error(export)
    assert "refused the API key (Invalid token.)" in message
    assert "LABEL_STUDIO_API_KEY" in message and "Personal Access Token" in message


def test_an_unknown_project_says_where_its_id_is_found(stage_dir):
    stage_dir(987654)
    message = stage_error(select)
    assert "has no project 987654" in message and "/projects/<id>/" in message
    assert "labelstudio.project" in message


def test_an_unreachable_server_is_retried_then_named(stage_dir, monkeypatch):
    stage_dir(1, retry_for=1)
    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("LABEL_STUDIO_URL", down)
    message = stage_error(export)
    assert f"Label Studio at {down} unreachable for 1 s (ConnectError" in message
    assert "LABEL_STUDIO_URL" in message


def test_commands_say_the_same(tmp_path, monkeypatch, capsys, label_studio):
    """prelabel --project and calibrate --project, with a wrong token and an unknown project."""
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio.token)
    model = make_model_dir(tmp_path / "m")
    assert cli(["prelabel", "--model", str(model), "--project", "987654", "--device", "cpu",
                "--retry-for", "1"]) != 0
    printed = capsys.readouterr().err.strip().splitlines()[-1]
    assert printed.startswith("tridentloop prelabel: error: prelabel: Label Studio at ")
    assert "has no project 987654" in printed
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "not-a-token")
    with pytest.raises(SystemExit) as ended:
        cli(["calibrate", "--model", str(model), "--project", "1", "--work-dir",
             str(tmp_path / "work"), "--device", "cpu"])
    assert "calibrate: Label Studio at" in str(ended.value)
    assert "refused the API key" in str(ended.value)
