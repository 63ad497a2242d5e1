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
from fcgi_engine.status_pass import request_path


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


@pytest.mark.parametrize(
    "params, path",
    [
        # nginx's stock fastcgi_params: the whole path in SCRIPT_NAME, DOCUMENT_URI beside it.
        (
            {
                "SCRIPT_NAME": "/fcgi-status",
                "REQUEST_URI": "/fcgi-status?x",
                "DOCUMENT_URI": "/fcgi-status",
            },
            "/fcgi-status",
        ),
        # The README's nginx: SCRIPT_NAME "" and PATH_INFO $uri.
        ({"SCRIPT_NAME": "", "PATH_INFO": "/fcgi-status", "REQUEST_URI": "/x"}, "/fcgi-status"),
        # Apache or lighttpd mounted at /app: split at the mount point.
        ({"SCRIPT_NAME": "/app", "PATH_INFO": "/fcgi-status"}, "/app/fcgi-status"),
        # Neither: nginx's $document_uri, else the request target without its query.
        ({"DOCUMENT_URI": "/fcgi-status", "REQUEST_URI": "/other"}, "/fcgi-status"),
        ({"SCRIPT_NAME": "", "REQUEST_URI": "/fcgi-status?openmetrics"}, "/fcgi-status"),
        ({}, ""),
    ],
)
def test_request_path_is_the_url_path_the_web_server_sent(
    params: dict[str, str], path: str
) -> None:
    assert request_path(params) == path


# ---------------------------------------------------------------- the end with the last chunk


def calls_of(app, environ: dict | None = None) -> list[tuple[str, bytes]]:
    """What run_app did with the response: ("send", data) and ("finish", data), in order."""
    calls: list[tuple[str, bytes]] = []
    run_app(
        app,
        environ or env(),
        lambda data: calls.append(("send", bytes(data))),
        lambda data: calls.append(("finish", bytes(data))),
    )
    return calls


def streaming(chunks, headers=()):
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), *headers])
        return chunks

    return app


def test_a_list_body_ends_with_its_last_chunk() -> None:
    calls = calls_of(streaming([b"one", b"two", b"three"]))
    assert [kind for kind, _data in calls] == ["send", "send", "finish"]
    assert calls[-1] == ("finish", b"three")


def test_content_length_reached_ends_the_request_and_later_chunks_are_dropped() -> None:
    def chunks():
        yield b"ab"
        yield b"cd"
        yield b""
        yield b"ef"  # past Content-Length: the app's bug, dropped

    calls = calls_of(streaming(chunks(), [("Content-Length", "4")]))
    assert [kind for kind, _data in calls] == ["send", "finish"]
    assert calls[-1] == ("finish", b"cd")


def test_a_body_of_len_one_ends_with_its_chunk() -> None:
    class One:
        def __len__(self) -> int:
            return 1

        def __iter__(self):
            yield b"only"

    # Head, body and end in one send.
    [(kind, data)] = calls_of(streaming(One()))
    assert kind == "finish" and data.endswith(b"\r\n\r\nonly")


def test_a_large_last_chunk_ends_with_its_last_slice() -> None:
    big = b"x" * (600 * 1024)
    calls = calls_of(streaming([big], [("Content-Length", str(len(big)))]))
    assert [kind for kind, _data in calls][-1] == "finish"
    assert b"".join(data for _kind, data in calls).endswith(big)
    assert len(calls[-1][1]) <= 256 * 1024


def test_an_unknown_end_goes_out_alone() -> None:
    calls = calls_of(streaming(iter([b"a", b"b"])))
    assert calls[-1] == ("finish", b"")


def test_content_length_zero_ends_with_the_head() -> None:
    calls = calls_of(streaming(iter([]), [("Content-Length", "0")]))
    assert len(calls) == 1 and calls[0][0] == "finish" and calls[0][1].endswith(b"\r\n\r\n")
