"""`fcgi-engine serve` and `request` against real processes, without a web server."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fcgi_engine.client import ClientError, Exchange, Response, encode_request, request
from fcgi_engine.protocol import RecordType, encode_record
from tests.conftest import APPS, ENGINE, can_connect, wait_for

pytestmark = pytest.mark.integration


def test_get_and_unix_socket_mode(serve) -> None:
    server = serve()
    response = request(server.address, "/hello")
    assert (response.status, response.body) == (200, b"hello world\n")
    assert stat.S_IMODE(os.stat(server.address).st_mode) == 0o660


def test_tcp_ipv4_and_ipv6_on_a_free_port_report_the_bound_address(serve) -> None:
    v4 = serve(listen="127.0.0.1:0")
    assert v4.address.startswith("127.0.0.1:") and not v4.address.endswith(":0")
    assert request(v4.address, "/hello").status == 200
    v6 = serve(listen="[::1]:0")
    assert v6.address.startswith("[::1]:") and not v6.address.endswith(":0")
    assert request(v6.address, "/hello").body == b"hello world\n"
    assert f"listening on {v6.address}" in v6.log()


def test_app_errors_give_500_and_traceback_in_log(serve) -> None:
    server = serve()
    response = request(server.address, "/error")
    assert response.status == 500
    assert b"boom" not in response.body
    wait_for(lambda: "boom: the app failed on purpose" in server.log(), 5, what="traceback in log")
    assert "Traceback" in server.log()
    # The worker carries on.
    assert request(server.address, "/hello").status == 200


def test_error_after_start_cuts_the_response_off(serve) -> None:
    server = serve()
    with pytest.raises(ClientError, match="before END_REQUEST"):
        request(server.address, "/error-after-start")
    assert request(server.address, "/hello").status == 200


def test_bad_header_is_a_500(serve) -> None:
    server = serve(f"{APPS}/testapp.py:raw")
    assert request(server.address, "/bad-header").status == 500


def test_exc_info_replaces_the_status(serve) -> None:
    server = serve()
    response = request(server.address, "/exc-info")
    assert (response.status, response.body) == (503, b"replaced")


def test_write_callable_and_close(serve, tmp: Path) -> None:
    close_file = tmp / "closed"
    server = serve(env={"TESTAPP_CLOSE_FILE": str(close_file)})
    assert request(server.address, "/write").body == b"written and returned"
    assert request(server.address, "/close").body == b"body"
    # close() runs right after the response is sent.
    wait_for(
        lambda: close_file.exists() and close_file.read_text() == "closed\n",
        5,
        what="close() to be called",
    )


def test_body_without_content_length_and_readline(serve) -> None:
    server = serve()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(server.address)
        response = post_lines(sock)
    assert json.loads(response.body) == ["one\n", "two\n", "three"]


def post_lines(sock: socket.socket) -> Response:
    """POST three lines to /lines without CONTENT_LENGTH, as nginx streams a body."""
    params = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/lines",
        "SERVER_NAME": "x",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "QUERY_STRING": "",
    }
    sock.sendall(encode_request(1, params, b"one\ntwo\nthree"))
    return Exchange(sock, 1).read_response()


def test_environ_normalisation(serve) -> None:
    server = serve()
    env = json.loads(
        request(
            server.address,
            "/env",
            params={
                "HTTPS": "on",
                "SCRIPT_NAME": "/env",
                "PATH_INFO": "",
                "SERVER_PORT": "",
                "HTTP_HOST": "example.org:8443",
            },
        ).body
    )
    assert env["wsgi.url_scheme"] == "https"
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("", "/env")
    assert env["SERVER_PORT"] == "8443"
    assert env["wsgi.input_terminated"] is True


def test_malformed_records_close_only_that_connection(serve) -> None:
    server = serve(nproc=1)
    for garbage in (
        b"\x07" * 64,
        encode_record(RecordType.STDIN, 5, b"x"),
        b"\x01\x01\x00\x01\xff\xff\x00\x00",
    ):
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(5)
        sock.connect(server.address)
        sock.sendall(garbage)
        if garbage.startswith(b"\x01\x01\x00\x01\xff\xff"):
            sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""
        sock.close()
    assert request(server.address, "/hello").status == 200


def test_get_values_over_the_socket(serve) -> None:
    from fcgi_engine.client import get_values

    server = serve(nproc=3)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(server.address)
        values = get_values(sock, ["FCGI_MAX_CONNS", "FCGI_MAX_REQS", "FCGI_MPXS_CONNS"])
    assert values == {"FCGI_MAX_CONNS": "3", "FCGI_MAX_REQS": "3", "FCGI_MPXS_CONNS": "0"}


def test_import_error_exits_nonzero_naming_it(tmp: Path) -> None:
    bad = tmp / "bad.py"
    bad.write_text("import no_such_module_anywhere\n")
    started = time.monotonic()
    proc = subprocess.run(
        [*ENGINE, "serve", str(bad), "--listen", str(tmp / "b.sock")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "no_such_module_anywhere" in proc.stderr
    assert time.monotonic() - started < 10
    assert not (tmp / "b.sock").exists()


def test_missing_module_exits_nonzero(tmp: Path) -> None:
    proc = subprocess.run(
        [
            *ENGINE,
            "serve",
            "nosuchmod:app",
            "--listen",
            str(tmp / "m.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0 and "nosuchmod" in proc.stderr


def test_live_socket_refused_stale_socket_replaced(serve, tmp: Path) -> None:
    server = serve()
    proc = subprocess.run(
        [
            *ENGINE,
            "serve",
            f"{APPS}/testapp.py",
            "--listen",
            server.address,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0 and "already listens" in proc.stderr
    assert request(server.address, "/hello").status == 200
    stale = tmp / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    fresh = serve(listen=str(stale))
    assert request(fresh.address, "/hello").status == 200


def test_term_finishes_in_flight_then_exits_and_removes_pidfile(serve) -> None:
    server = serve(nproc=1)
    import threading

    result: dict[str, object] = {}

    def slow() -> None:
        result["r"] = request(server.address, "/slow?s=1.5")

    thread = threading.Thread(target=slow)
    thread.start()
    wait_for(lambda: _busy(server), 5, what="the request to be in flight")
    server.proc.send_signal(signal.SIGTERM)
    thread.join(10)
    assert result["r"].status == 200  # type: ignore[attr-defined]
    assert server.proc.wait(10) == 0
    assert not os.path.exists(server.pidfile)
    assert not os.path.exists(server.address)
    wait_for(lambda: not server.tree(), 5, what="no process left")


def _busy(server) -> bool:
    from fcgi_engine import control

    status = control.call(server.pidfile + ".ctl", {"cmd": "status"})["status"]
    return any(w["state"] == "busy" for w in status["workers"])


def test_daemon_returns_when_ready(tmp: Path) -> None:
    sock = str(tmp / "d.sock")
    pidfile = str(tmp / "d.pid")
    env = dict(os.environ, FCGI_TEST_TAG=f"daemon-{time.monotonic_ns()}")
    proc = subprocess.run(
        [
            *ENGINE,
            "serve",
            f"{APPS}/testapp.py",
            "--listen",
            sock,
            "--pidfile",
            pidfile,
            "--daemon",
            "--error-log",
            str(tmp / "d.log"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    try:
        assert proc.returncode == 0, proc.stderr
        assert request(sock, "/hello").status == 200  # ready when it returned
        pid = int(Path(pidfile).read_text())
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not os.path.exists(pidfile), 15, what="the daemon to stop")
    finally:
        from tests.conftest import kill_tagged

        kill_tagged(env["FCGI_TEST_TAG"])


def test_daemon_reports_boot_error(tmp: Path) -> None:
    bad = tmp / "bad.py"
    bad.write_text("raise SystemError('cannot boot today')\n")
    proc = subprocess.run(
        [
            *ENGINE,
            "serve",
            str(bad),
            "--listen",
            str(tmp / "x.sock"),
            "--daemon",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert "cannot boot today" in proc.stderr


def assert_answers_then_stop(proc: subprocess.Popen, path: str, tag: str) -> None:
    """The server started outside the fixture answers on `path`; then it and its tree stop."""
    from tests.conftest import kill_tagged

    with proc:  # closes its pipes
        try:
            wait_for(lambda: request(path, "/hello").status == 200, 15, what=f"a server on {path}")
        finally:
            proc.terminate()
            proc.wait(15)
            kill_tagged(tag)


def test_fd0_listening_socket(tmp: Path) -> None:
    path = str(tmp / "fd0.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(16)
    env = dict(os.environ, FCGI_TEST_TAG=f"fd0-{time.monotonic_ns()}")
    proc = subprocess.Popen(
        [*ENGINE, "serve", f"{APPS}/testapp.py"],
        stdin=listener.fileno(),
        env=env,
        stderr=subprocess.PIPE,
    )
    listener.close()
    assert_answers_then_stop(proc, path, env["FCGI_TEST_TAG"])


def test_request_cli(serve) -> None:
    server = serve()
    out = subprocess.run(
        [
            *ENGINE,
            "request",
            server.address,
            "/echo",
            "-d",
            "abc",
            "-i",
        ],
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0
    assert out.stdout.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b'"length": 3' in out.stdout
    missing = subprocess.run(
        [*ENGINE, "request", "/nonexistent.sock"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 1 and "cannot connect" in missing.stderr
    fail = subprocess.run(
        [*ENGINE, "request", server.address, "/nope", "-f"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert fail.returncode == 22


def test_request_cli_protocol_breaker(tmp: Path) -> None:
    path = str(tmp / "liar.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    import threading

    def liar() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nnot fastcgi")
        conn.close()

    threading.Thread(target=liar, daemon=True).start()
    out = subprocess.run(
        [*ENGINE, "request", path],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1 and "version" in out.stderr
    listener.close()


def test_worker_killed_is_replaced(serve) -> None:
    from fcgi_engine import control

    server = serve(nproc=2)
    status = control.call(server.pidfile + ".ctl", {"cmd": "status"})["status"]
    victim = status["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        st = control.call(server.pidfile + ".ctl", {"cmd": "status"})["status"]
        pids = [w["pid"] for w in st["workers"]]
        return victim not in pids and len(pids) == 2

    wait_for(replaced, 5, what="the worker to be replaced")
    assert request(server.address, "/hello").status == 200
    assert can_connect(server.address)


def test_access_log_and_usr1_reopen(serve, tmp: Path) -> None:
    log_path = tmp / "access.log"
    server = serve(f"{APPS}/testapp.py", "--access-log", str(log_path), nproc=1)
    assert request(server.address, "/hello?x=1").status == 200
    assert request(server.address, "/nope").status == 404
    wait_for(
        lambda: log_path.exists() and log_path.read_text().count("\n") == 2,
        5,
        what="two access log lines",
    )
    first, second = log_path.read_text().splitlines()
    assert '"GET /hello?x=1 HTTP/1.1" 200 ' in first
    assert '"GET /nope HTTP/1.1" 404 ' in second
    log_path.rename(tmp / "access.log.1")
    os.kill(server.pid, signal.SIGUSR1)

    def reopened() -> bool:
        request(server.address, "/hello")
        return log_path.exists() and "/hello" in log_path.read_text()

    wait_for(reopened, 5, what="the access log to be reopened")


def test_body_over_max_body_size_is_413(serve) -> None:
    server = serve(f"{APPS}/testapp.py", "--max-body-size", "1000", nproc=1)
    response = request(server.address, "/echo", "POST", b"x" * 5000)
    assert response.status == 413
    assert request(server.address, "/echo", "POST", b"x" * 10).status == 200


def test_tcp_clients_outside_the_allow_list_are_refused(serve) -> None:
    server = serve(listen="127.0.0.1:0", env={"FCGI_WEB_SERVER_ADDRS": "10.9.9.9"})
    with pytest.raises(ClientError):
        request(server.address, "/hello", timeout=5)
    wait_for(lambda: "not in FCGI_WEB_SERVER_ADDRS" in server.log(), 5, what="the refusal log")
    allowed = serve(listen="127.0.0.1:0", env={"FCGI_WEB_SERVER_ADDRS": "10.9.9.9, 127.0.0.1"})
    assert request(allowed.address, "/hello").status == 200


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_app_runs_as_the_configured_user(serve) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    # The interpreter must be readable by that user: the system one, not one under /root.
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    server = serve(f"{APPS}/testapp.py", "--user", "nobody", "--python", python, nproc=1)
    ids = json.loads(request(server.address, "/whoami").body)
    assert ids == {"uid": nobody.pw_uid, "gid": nobody.pw_gid}
    # The socket belongs to the app's user too, still with the restrictive mode.
    st = os.stat(server.address)
    assert st.st_uid == nobody.pw_uid and stat.S_IMODE(st.st_mode) == 0o660


def test_python_virtualenv_without_fcgi_engine_boots_the_app(serve, tmp: Path) -> None:
    venv = tmp / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    (tmp / "venvapp.py").write_text(
        "import sys\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [sys.prefix.encode()]\n"
    )
    server = serve(str(tmp / "venvapp.py"), "--python", str(venv), nproc=1)
    assert request(server.address, "/").body == str(venv).encode()


def test_systemd_socket_activation(tmp: Path) -> None:
    path = str(tmp / "sd.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(16)
    fd = listener.fileno()
    env = dict(os.environ, FCGI_TEST_TAG=f"sd-{time.monotonic_ns()}", LISTEN_FDS="1")

    def as_fd3() -> None:
        os.dup2(fd, 3)

    # LISTEN_PID must be the server's own pid: a shell sets it to $$ and execs in place.
    proc = subprocess.Popen(
        [
            "sh",
            "-c",
            f'LISTEN_PID=$$ exec "{sys.executable}" -m fcgi_engine serve '
            f'"{APPS}/testapp.py" --nproc 1',
        ],
        env=env,
        preexec_fn=as_fd3,
        pass_fds=(fd, 3),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    listener.close()
    assert_answers_then_stop(proc, path, env["FCGI_TEST_TAG"])
