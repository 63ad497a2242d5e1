"""WSGI environ normalisation, wsgi.input streaming and the app runner, without processes."""

from __future__ import annotations

import io
from wsgiref.validate import validator

import pytest

from fcgi_engine.serving.body import BodyTooLarge, InputStream
from fcgi_engine.serving.environ import build_environ
from fcgi_engine.serving.wsgi import (
    HeaderError,
    ResponseCutOff,
    run_app,
    validate_headers,
    validate_status,
)


def env(**params: str) -> dict:
    return build_environ(params, InputStream(lambda: b""), io.StringIO())


@pytest.mark.parametrize(
    "params, script, path",
    [
        ({"SCRIPT_NAME": "/a/b", "PATH_INFO": ""}, "", "/a/b"),  # nginx stock fastcgi_params
        ({"SCRIPT_NAME": "", "PATH_INFO": "/a/b"}, "", "/a/b"),  # PATH_INFO $uri
        ({"SCRIPT_NAME": "/", "PATH_INFO": ""}, "", "/"),  # lighttpd at the root
        (
            {
                "SCRIPT_NAME": "/app.py",
                "PATH_INFO": "/app.py/x",
                "SERVER_SOFTWARE": "Microsoft-IIS/10.0",
            },
            "/app.py",
            "/x",
        ),  # IIS
        ({"REQUEST_URI": "/q/r?x=1"}, "", "/q/r"),  # nothing but REQUEST_URI
    ],
)
def test_path_conventions(params: dict, script: str, path: str) -> None:
    e = env(**params)
    assert (e["SCRIPT_NAME"], e["PATH_INFO"]) == (script, path)


def test_mount_point() -> None:
    e = build_environ(
        {"SCRIPT_NAME": "/shop/cart", "PATH_INFO": ""},
        InputStream(lambda: b""),
        io.StringIO(),
        script_name="/shop",
    )
    assert (e["SCRIPT_NAME"], e["PATH_INFO"]) == ("/shop", "/cart")


def test_server_port_https_and_dropped_keys() -> None:
    e = env(HTTPS="on", HTTP_HOST="h.example:8443", CONTENT_LENGTH="", HTTP_CONTENT_LENGTH="5")
    assert e["wsgi.url_scheme"] == "https"
    assert e["SERVER_PORT"] == "8443" and e["SERVER_NAME"] == "h.example"
    assert "CONTENT_LENGTH" not in e and "HTTP_CONTENT_LENGTH" not in e
    assert env()["SERVER_PORT"] == "80"
    assert env(HTTPS="on")["SERVER_PORT"] == "443"


def stream(*chunks: bytes, max_size: int = 0) -> InputStream:
    it = iter(chunks)
    return InputStream(lambda: next(it, b""), max_size)


def test_input_read_readline_iteration() -> None:
    s = stream(b"ab", b"c\nde", b"f\n", b"tail")
    assert s.read(1) == b"a"
    assert s.readline() == b"bc\n"
    assert s.readline(2) == b"de"
    assert list(s) == [b"f\n", b"tail"]
    assert s.read() == b"" and s.read(5) == b""
    assert stream(b"x" * 10, b"y" * 10).read() == b"x" * 10 + b"y" * 10


def test_input_limit() -> None:
    with pytest.raises(BodyTooLarge):
        stream(b"x" * 10, b"y" * 10, max_size=15).read()


def test_header_validation() -> None:
    assert validate_status("200 OK") == "200 OK"
    for bad in ("200", "OK 200", "200 OK\r\nX: y", b"200 OK"):
        with pytest.raises(HeaderError):
            validate_status(bad)
    for headers in (
        [("Bad Name", "v")],
        [("X", "a\nb")],
        [("Connection", "close")],
        [("X", "é€")],
        ("X", "y"),
    ):
        with pytest.raises(HeaderError):
            validate_headers(headers)


def run(app, environ=None) -> tuple[list[bytes], list[bytes]]:
    sent: list[bytes] = []
    finished: list[bytes] = []
    run_app(
        app,
        environ or env(REQUEST_METHOD="GET", PATH_INFO="/", QUERY_STRING=""),
        lambda d: sent.append(bytes(d)),
        finished.append,
    )
    return sent, finished


def test_single_chunk_goes_out_with_the_end() -> None:
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"hi"]

    sent, finished = run(app)
    assert sent == [] and finished == [b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\nhi"]
    # Through wsgiref's validator the body is an iterator: head and body first, then the end.
    sent, finished = run(validator(app))
    assert b"".join(sent + finished).endswith(b"\r\n\r\nhi")


def test_generator_streams_and_error_before_start_is_500() -> None:
    def app(environ, start_response):
        start_response("200 OK", [])
        yield b"a"
        yield b"b"

    sent, finished = run(app)
    assert sent == [b"Status: 200 OK\r\n\r\na", b"b"] and finished == [b""]

    def broken(environ, start_response):
        raise ValueError("x")

    sent, finished = run(broken)
    assert finished[0].startswith(b"Status: 500")


def test_error_after_start_cuts_off() -> None:
    def app(environ, start_response):
        start_response("200 OK", [])
        yield b"a"
        raise ValueError("late")

    with pytest.raises(ResponseCutOff):
        run(app)
