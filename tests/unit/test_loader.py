"""APP specs as users write them: Django's dotted `mysite.wsgi`, factories, files."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcgi_engine.serving.loader import AppLoadError, load_app, split_app_spec

WSGI = """
def application(environ, start_response):
    start_response("200 OK", [])
    return [b"site"]
"""
FACTORY = """
def create_app(name="default", debug=False):
    def app(environ, start_response):
        start_response("200 OK", [])
        return [f"{name} {debug}".encode()]
    return app
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A project directory as the working directory: mysite/wsgi.py and factory.py."""
    (tmp_path / "mysite").mkdir()
    (tmp_path / "mysite" / "__init__.py").write_text("")
    (tmp_path / "mysite" / "wsgi.py").write_text(WSGI)
    (tmp_path / "factory.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def body(app: object) -> bytes:
    return b"".join(app({}, lambda *a: None))  # type: ignore[operator]


def test_djangos_dotted_wsgi_module_is_a_module_not_a_file(site: Path) -> None:
    assert body(load_app("mysite.wsgi")) == b"site"
    assert body(load_app("mysite.wsgi:application")) == b"site"


def test_a_wsgi_file_that_exists_is_still_a_file(site: Path) -> None:
    (site / "site.wsgi").write_text(WSGI)
    assert body(load_app("site.wsgi")) == b"site"
    assert body(load_app(str(site / "mysite" / "wsgi.py"))) == b"site"


def test_a_factory_is_called_with_literal_arguments(site: Path) -> None:
    assert body(load_app("factory:create_app()")) == b"default False"
    assert body(load_app("factory:create_app('prod', debug=True)")) == b"prod True"
    assert body(load_app("factory:create_app('a:b/c')")) == b"a:b/c False"


def test_a_factory_with_code_for_arguments_is_refused(site: Path) -> None:
    with pytest.raises(AppLoadError, match="literal arguments"):
        load_app("factory:create_app(__import__('os'))")
    with pytest.raises(AppLoadError, match="defines no 'make'"):
        load_app("factory:make()")


def test_spec_forms_split_into_target_and_callable() -> None:
    assert split_app_spec("pkg.mod:app") == ("pkg.mod", "app")
    assert split_app_spec("pkg.mod") == ("pkg.mod", "application")
    assert split_app_spec("/srv/site/app.py") == ("/srv/site/app.py", "application")
    assert split_app_spec("/srv/site/app.py:app") == ("/srv/site/app.py", "app")
    assert split_app_spec("m:create_app(x=':')") == ("m", "create_app(x=':')")
