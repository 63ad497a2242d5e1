"""The ASGI scope built from FastCGI params: the same normalisation as the WSGI environ."""

from __future__ import annotations

import pytest

from fcgi_engine.serving.asgi_scope import build_scope, response_head, status_line
from fcgi_engine.serving.environ import build_environ


def nginx_params(**extra: str) -> dict[str, str]:
    params = {
        "REQUEST_METHOD": "post",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/items/42",
        "REQUEST_URI": "/items/42?a=1&b=%20",
        "QUERY_STRING": "a=1&b=%20",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REQUEST_SCHEME": "http",
        "SERVER_NAME": "example.org",
        "SERVER_PORT": "8080",
        "REMOTE_ADDR": "10.0.0.7",
        "REMOTE_PORT": "51234",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": "7",
        "HTTP_HOST": "example.org:8080",
        "HTTP_X_FORWARDED_FOR": "1.2.3.4",
        "HTTP_CONTENT_TYPE": "ignored: CONTENT_TYPE wins",
    }
    params.update(extra)
    return params


def test_http_scope_from_nginx_params() -> None:
    scope = build_scope(nginx_params())
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "POST"
    assert scope["scheme"] == "http"
    assert scope["path"] == "/items/42"
    assert scope["raw_path"] == b"/items/42"
    assert scope["root_path"] == ""
    assert scope["query_string"] == b"a=1&b=%20"
    assert scope["client"] == ("10.0.0.7", 51234)
    assert scope["server"] == ("example.org", 8080)
    assert scope["headers"] == [
        (b"host", b"example.org:8080"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"content-type", b"application/json"),
        (b"content-length", b"7"),
    ]
    assert "state" not in scope


@pytest.mark.parametrize(
    ("extra", "scheme"),
    [
        ({"HTTPS": "on"}, "https"),
        ({"HTTPS": "off", "REQUEST_SCHEME": "https"}, "https"),
        ({"REQUEST_SCHEME": "gopher"}, "http"),
        ({"HTTPS": "1"}, "https"),
    ],
)
def test_scheme(extra: dict[str, str], scheme: str) -> None:
    assert build_scope(nginx_params(**extra))["scheme"] == scheme


@pytest.mark.parametrize(
    ("protocol", "version"),
    [("HTTP/1.0", "1.0"), ("HTTP/1.1", "1.1"), ("HTTP/2.0", "2"), ("HTTP/2", "2")],
)
def test_http_version(protocol: str, version: str) -> None:
    assert build_scope(nginx_params(SERVER_PROTOCOL=protocol))["http_version"] == version


@pytest.mark.parametrize(
    ("extra", "script_name"),
    [
        # nginx's stock params: the whole path in SCRIPT_NAME, no PATH_INFO.
        ({"SCRIPT_NAME": "/app/items/42", "PATH_INFO": ""}, None),
        ({"SCRIPT_NAME": "/app/items/42", "PATH_INFO": ""}, "/app"),
        ({"SCRIPT_NAME": "", "PATH_INFO": "/app/items/42"}, "/app/"),
        ({"SCRIPT_NAME": "/app", "PATH_INFO": "/items/42"}, None),
        # UTF-8 in the path: each byte one latin-1 character in the params.
        ({"PATH_INFO": "/caf\u00c3\u00a9", "REQUEST_URI": "/caf%C3%A9"}, None),
        ({"SERVER_SOFTWARE": "Microsoft-IIS/10", "SCRIPT_NAME": "/s", "PATH_INFO": "/s/x"}, None),
        ({"SERVER_NAME": "", "SERVER_PORT": "", "HTTP_HOST": "[::1]:8443"}, None),
    ],
)
def test_paths_decoded_as_the_environ_decodes_them(
    extra: dict[str, str], script_name: str | None
) -> None:
    """path is SCRIPT_NAME + PATH_INFO of the environ, root_path its SCRIPT_NAME, in UTF-8."""
    environ = build_environ(nginx_params(**extra), None, None, script_name)
    scope = build_scope(nginx_params(**extra), script_name)
    utf8 = lambda s: s.encode("latin-1").decode("utf-8")  # noqa: E731
    assert scope["root_path"] == utf8(environ["SCRIPT_NAME"])
    assert scope["path"] == utf8(environ["SCRIPT_NAME"] + environ["PATH_INFO"])
    assert scope["server"] == (environ["SERVER_NAME"], int(environ["SERVER_PORT"]))


def test_utf8_path_and_raw_path() -> None:
    scope = build_scope(nginx_params(PATH_INFO="/caf\u00c3\u00a9", REQUEST_URI="/caf%C3%A9?x"))
    assert scope["path"] == "/caf\u00e9"
    assert scope["raw_path"] == b"/caf%C3%A9"


def test_raw_path_without_request_uri_is_quoted() -> None:
    params = nginx_params(PATH_INFO="/a b/caf\u00c3\u00a9")
    del params["REQUEST_URI"]
    assert build_scope(params)["raw_path"] == b"/a%20b/caf%C3%A9"


def test_mount_point_is_root_path() -> None:
    scope = build_scope(nginx_params(PATH_INFO="/api/v1/users"), "/api")
    assert scope["root_path"] == "/api"
    assert scope["path"] == "/api/v1/users"


def test_defaults_when_params_are_missing() -> None:
    scope = build_scope({"SCRIPT_NAME": "/x"})
    assert scope["method"] == "GET"
    assert scope["path"] == "/x"
    assert scope["query_string"] == b""
    assert scope["http_version"] == "1.1"
    assert scope["client"] is None
    assert scope["server"] == ("localhost", 80)
    assert scope["headers"] == []


def test_empty_content_headers_are_dropped() -> None:
    scope = build_scope(nginx_params(CONTENT_TYPE="", CONTENT_LENGTH=" "))
    names = [name for name, _value in scope["headers"]]
    assert b"content-type" not in names and b"content-length" not in names


def test_state_is_a_copy_per_request() -> None:
    state = {"db": "pool"}
    scope = build_scope(nginx_params(), state=state)
    assert scope["state"] == state
    scope["state"]["db"] = "changed"
    assert state["db"] == "pool"


def test_response_head() -> None:
    head = response_head(201, [(b"content-type", b"text/plain"), (b"x-a", b"1")])
    assert head == b"Status: 201 Created\r\ncontent-type: text/plain\r\nx-a: 1\r\n\r\n"
    assert status_line(599) == b"Status: 599 Unknown\r\n"


@pytest.mark.parametrize(
    "header",
    [(b"x-a", b"1\r\nSet-Cookie: evil"), (b"x-a\r\nx-b", b"1"), (b"", b"1"), (b"x:y", b"1")],
)
def test_response_head_refuses_split_headers(header: tuple[bytes, bytes]) -> None:
    with pytest.raises(ValueError):
        response_head(200, [header])
