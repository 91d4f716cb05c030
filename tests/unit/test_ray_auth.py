"""A driver joining a cluster by address asks for token authentication exactly when `ray start` on this
machine would have turned it on: when a token exists (Ray 2.60)."""

from __future__ import annotations

from pathlib import Path

import pytest

from adsfm.contract.cluster import ray_auth_as_ray_start


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(name, "")  # recorded first, so what the function sets is undone after the test
        monkeypatch.delenv(name)
    return tmp_path


def test_no_token_no_authentication(home: Path) -> None:
    import os

    ray_auth_as_ray_start()
    assert "RAY_AUTH_MODE" not in os.environ  # a fresh machine's `ray start` cluster takes no token


@pytest.mark.parametrize("where", ["home", "path", "env"])
def test_a_token_turns_it_on(home: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    import os

    if where == "home":
        (home / ".ray").mkdir()
        (home / ".ray" / "auth_token").write_text("abc\n")
    elif where == "path":
        (home / "t").write_text("abc")
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(home / "t"))
    else:
        monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    ray_auth_as_ray_start()
    assert os.environ["RAY_AUTH_MODE"] == "token"


def test_the_users_choice_stays(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    ray_auth_as_ray_start()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
