"""A Django project (tests/apps/djangosite: startproject trimmed, sqlite) through a real nginx:
migrate, the admin login with its CSRF POST on threaded WSGI workers, concurrency on threads,
and the same site through Django's ASGI handler (which does not speak lifespan)."""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from http.cookies import SimpleCookie
from pathlib import Path

import pytest

from tests.conftest import APPS

pytestmark = pytest.mark.integration

SITE = APPS / "djangosite"
WSGI_APP = f"{SITE}/mysite/wsgi.py"
ASGI_APP = f"{SITE}/mysite/asgi.py"
USER, PASSWORD = "admin", "correct-horse-battery"
TIMEOUT = 10  # seconds, for every HTTP request


def django_env(tmp: Path) -> dict[str, str]:
    """The environment of the site: its settings, its tree importable, its database in `tmp`."""
    path = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH", "")) if p)
    return {
        "DJANGO_SETTINGS_MODULE": "mysite.settings",
        "DJANGO_DB_DIR": str(tmp),
        "PYTHONPATH": path,
    }


def manage(tmp: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """`python -m django ARGS` for the site, failing the test with its output if it fails."""
    result = subprocess.run(
        [sys.executable, "-m", "django", *args],
        env=dict(os.environ, **django_env(tmp), **(env or {})),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"django {args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture
def site(tmp: Path) -> dict[str, str]:
    """A migrated database with a superuser; the environment to serve the site with."""
    manage(tmp, "migrate", "--noinput")
    manage(
        tmp,
        "createsuperuser",
        "--noinput",
        "--username",
        USER,
        "--email",
        "admin@example.com",
        env={"DJANGO_SUPERUSER_PASSWORD": PASSWORD},
    )
    assert (tmp / "db.sqlite3").exists()
    return django_env(tmp)


class Browser:
    """Just enough of a browser: one HTTP connection a request, cookies kept, no redirects
    followed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}

    def request(
        self, method: str, path: str, form: dict[str, str] | None = None
    ) -> tuple[int, str, http.client.HTTPResponse]:
        headers = {}
        body = None
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
        finally:
            conn.close()
        for header in response.headers.get_all("Set-Cookie") or []:
            for name, morsel in SimpleCookie(header).items():
                self.cookies[name] = morsel.value
        return response.status, text, response


def log_in_to_admin(port: int) -> None:
    """The admin login as a person does it: the form, its CSRF token, the POST, the admin."""
    browser = Browser(port)
    status, page, _ = browser.request("GET", "/admin/login/?next=/admin/")
    assert status == 200, page[:2000]
    assert "csrftoken" in browser.cookies, browser.cookies
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert match, page[:2000]

    # Without the token Django refuses the POST: the CSRF check is really on.
    refused = Browser(port)
    refused.cookies = dict(browser.cookies)
    status, _, _ = refused.request(
        "POST", "/admin/login/", {"username": USER, "password": PASSWORD}
    )
    assert status == 403

    status, page, response = browser.request(
        "POST",
        "/admin/login/?next=/admin/",
        {
            "csrfmiddlewaretoken": match.group(1),
            "username": USER,
            "password": PASSWORD,
            "next": "/admin/",
        },
    )
    assert status == 302, page[:2000]
    assert response.getheader("Location") == "/admin/"
    assert "sessionid" in browser.cookies, browser.cookies

    status, page, _ = browser.request("GET", "/admin/")
    assert status == 200, page[:2000]
    assert "Site administration" in page
    assert f"<strong>{USER}</strong>" in page  # "Welcome, admin." in the user tools
    assert "Log out" in page


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def at_once(port: int, path: str, count: int) -> tuple[list[tuple[int, bytes]], float]:
    """GET `path` `count` times at once, each on its own connection: answers and time taken."""
    results: list[tuple[int, bytes]] = [(0, b"")] * count

    def one(i: int) -> None:
        try:
            results[i] = get(port, path)
        except OSError as exc:
            results[i] = (-1, repr(exc).encode())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT + 5)
    return results, time.monotonic() - began


def test_admin_login_with_csrf_on_threaded_workers(serve, nginx, site) -> None:
    server = serve(WSGI_APP, "--threads", "4", nproc=1, env=site)
    front = nginx(server.address)
    assert get(front.port, "/hello/") == (200, b"hello from django\n")
    assert get(front.port, "/kind/") == (200, b"WSGIRequest True\n")  # wsgi.multithread
    log_in_to_admin(front.port)
    assert get(front.port, "/no-such-page/")[0] == 404
    assert "upstream prematurely" not in front.error_log()
    assert "Traceback" not in server.log(), server.log()


@pytest.mark.parametrize("keep_conn", [False, True], ids=["keepconn-off", "keepconn-on"])
def test_four_waits_finish_together_on_four_threads(serve, nginx, site, keep_conn: bool) -> None:
    server = serve(WSGI_APP, "--threads", "4", nproc=1, env=site)
    front = nginx(server.address, keep_conn=keep_conn)
    assert get(front.port, "/hello/")[0] == 200  # Django has loaded its URLconf
    for _round in range(2):  # the second round reuses nginx's kept-alive connections
        results, took = at_once(front.port, "/wait/", 4)
        assert [status for status, _ in results] == [200] * 4, results
        # Four threads of one worker served them.
        assert len({body for _, body in results}) == 4, results
        assert took < 1.5, f"4 x 0.5 s took {took:.2f} s"
    assert "Traceback" not in server.log(), server.log()


def test_django_asgi_handler(serve, nginx, site) -> None:
    # Auto-detected as ASGI; Django's ASGIHandler raises on the lifespan scope, which under
    # `lifespan: auto` means "no lifespan", not a failed boot.
    server = serve(ASGI_APP, nproc=1, env=site)
    assert server.status().get("generation")
    front = nginx(server.address)
    assert get(front.port, "/hello/") == (200, b"hello from django\n")
    status, kind = get(front.port, "/kind/")
    assert (status, kind.split()[0]) == (200, b"ASGIRequest"), kind
    status, page = get(front.port, "/admin/login/")
    assert status == 200
    assert b"csrfmiddlewaretoken" in page
    log_in_to_admin(front.port)
    assert "upstream prematurely" not in front.error_log()
    assert "Traceback" not in server.log(), server.log()


def test_django_asgi_handler_with_lifespan_on_fails_the_boot(serve, site) -> None:
    # Asked for lifespan events, an app that refuses them is a failed boot, with Django's error.
    server = serve(ASGI_APP, "--lifespan", "on", nproc=1, env=site, wait=False)
    assert server.proc.wait(30) != 0
    assert "ASGI lifespan startup failed" in server.log(), server.log()
    assert "can only handle ASGI/HTTP connections, not lifespan" in server.log(), server.log()
