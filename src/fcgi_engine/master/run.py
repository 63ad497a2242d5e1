"""Set up and run one master: bind (or inherit) the socket, pidfile, control socket, daemon."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys

from fcgi_engine.config.address import AddressError, UnixAddress, parse_address
from fcgi_engine.config.settings import (
    IdentityError,
    ServerConfig,
    loopback_only_warning,
    resolve_allowed_addrs,
    run_as,
)
from fcgi_engine.master.loop import REEXEC_ENV, MasterLoop, ReexecState
from fcgi_engine.system import pidfile as pidfiles
from fcgi_engine.system import sockets
from fcgi_engine.system.logfile import is_stream, redirect_stderr

log = logging.getLogger("fcgi_engine.master")


class StartError(Exception):
    """The server could not start; the message says why."""


def setup_logging(cfg: ServerConfig) -> None:
    if cfg.error_log:
        redirect_stderr(cfg.error_log)
    root = logging.getLogger()
    level = getattr(logging, cfg.log_level.upper(), logging.INFO)
    if not root.handlers:
        logging.basicConfig(
            level=level,
            format="%(asctime)s [%(name)s %(process)d] %(levelname)s %(message)s",
            stream=sys.stderr,
        )
    else:
        root.setLevel(level)


def _owner(cfg: ServerConfig) -> tuple[int, int] | None:
    """Who owns a unix socket we create: the app's user and group (as root), else us."""
    identity = run_as(cfg.user, cfg.group)
    return (identity.uid, identity.gid) if identity is not None else None


def preflight(cfg: ServerConfig) -> None:
    """Refuse, before binding anything, what would make the server lie or run as the wrong user.

    Raises StartError saying what to do.
    """
    try:
        run_as(cfg.user, cfg.group)
    except IdentityError as exc:
        raise StartError(str(exc)) from None
    try:
        resolve_allowed_addrs(cfg)
    except AddressError as exc:
        raise StartError(f"{exc}; fix or unset it") from None
    if cfg.pidfile:
        try:
            pidfiles.ensure_pidfile_directory(cfg.pidfile)
        except pidfiles.UnsafeDirectory as exc:
            raise StartError(str(exc)) from None


def open_listener(cfg: ServerConfig, inherit_fd0: bool) -> tuple[socket.socket, str | None]:
    """The listening socket and, for a unix socket we created, its path (to remove at exit)."""
    if inherit_fd0:
        activated = sockets.systemd_listen_fd()
        if activated is not None:
            sock = sockets.listening_socket_from_fd(activated)
            if sock is None:
                raise StartError(f"LISTEN_FDS names fd {activated}, which is not listening")
            sock.set_inheritable(False)
            return sock, None
        sock = sockets.listening_socket_from_fd(0)
        if sock is None:
            raise StartError(
                "no socket to serve on: give --listen ADDR (or start it from a web server "
                "with the socket as fd 0, or by systemd socket activation)"
            )
        # Move it off fd 0 so fd 0 can be /dev/null like any daemon's.
        moved = socket.socket(fileno=os.dup(sock.fileno()))
        moved.set_inheritable(False)
        sock.detach()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        return moved, None
    try:
        # Port 0: any free port; the log line and the status say which one.
        address = parse_address(cfg.socket, any_port=True)
        return sockets.bind(address, cfg.socket_mode, _owner(cfg)), (
            os.path.abspath(address.path) if isinstance(address, UnixAddress) else None
        )
    except (OSError, ValueError) as exc:
        raise StartError(f"cannot listen on {cfg.socket}: {exc}") from exc


def serve(cfg: ServerConfig, *, inherit_fd0: bool = False, daemon: bool = False) -> int:
    """Run the master until it stops; returns the exit code."""
    adopted = os.environ.pop(REEXEC_ENV, None)
    if adopted:
        return _serve_adopted(cfg, ReexecState.from_json(adopted))
    ready_fd = -1
    if daemon:
        ready_fd = _daemonize(cfg)
    setup_logging(cfg)
    try:
        preflight(cfg)
        listener, unix_path = open_listener(cfg, inherit_fd0)
    except StartError as exc:
        _fail_early(ready_fd, str(exc))
        return 1
    identity = sockets.unix_socket_identity(unix_path) if unix_path else None
    control_sock = None
    control_path = cfg.control_path
    try:
        if cfg.pidfile:
            pidfiles.write_pidfile(cfg.pidfile, os.getpid())
        if control_path:
            control_sock = _bind_control(control_path)
    except (OSError, pidfiles.PidfileError) as exc:
        _fail_early(ready_fd, f"cannot write {cfg.pidfile}: {exc}")
        listener.close()
        if unix_path:
            sockets.remove_unix_socket(unix_path, identity)
        return 1
    where = unix_path or sockets.describe(listener)
    log.info("%s: master %d listening on %s", cfg.name, os.getpid(), where)
    _log_peer_policy(cfg, listener)
    status_path: str | None = None
    status_listener = None
    if cfg.status_listen:
        try:
            status_listener, status_path = open_status_listener(cfg.status_listen)
        except StartError as exc:
            _fail_early(ready_fd, str(exc))
            listener.close()
            if unix_path:
                sockets.remove_unix_socket(unix_path, identity)
            _cleanup(cfg, None, None, control_path)
            return 1
    loop = MasterLoop(
        cfg,
        listener,
        control_sock=control_sock,
        ready_fd=ready_fd,
        unix_path=unix_path,
        owns_listener=not inherit_fd0,
        status_listener=status_listener,
    )
    status_identity = sockets.unix_socket_identity(status_path) if status_path else None
    try:
        return loop.run()
    finally:
        if status_path:
            sockets.remove_unix_socket(status_path, status_identity)
        _cleanup(cfg, unix_path, identity, control_path)


def open_status_listener(addr: str) -> tuple[socket.socket, str | None]:
    """The status_listen socket (HTTP for orchestrators) and, when a unix socket, its path."""
    try:
        address = parse_address(addr, any_port=True)
        sock = sockets.bind(address, 0o660)
    except (OSError, ValueError) as exc:
        raise StartError(f"cannot listen on status_listen {addr}: {exc}") from exc
    sock.set_inheritable(False)
    path = os.path.abspath(address.path) if isinstance(address, UnixAddress) else None
    log.info("status_listen: /readyz, /livez and /status on %s", path or sockets.describe(sock))
    return sock, path


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool((mapped or ip).is_loopback)


def _log_peer_policy(cfg: ServerConfig, listener: socket.socket) -> None:
    """Say which TCP peers the server accepts: anyone who can connect can set REMOTE_USER,
    REMOTE_ADDR or HTTPS for the app, so this must never be a surprise."""
    if listener.family not in (socket.AF_INET, socket.AF_INET6):
        return
    host = str(listener.getsockname()[0])
    where = sockets.describe(listener)
    if cfg.command:
        # A foreign program accepts on the socket itself: our allow-list cannot apply.
        log.info(
            "%s: TCP peers on %s are filtered by the command itself, if at all (php-cgi reads "
            "$FCGI_WEB_SERVER_ADDRS), not by fcgi-engine",
            cfg.name,
            where,
        )
        return
    allowed = resolve_allowed_addrs(cfg)
    source = {
        "allowed_addrs": "allowed_addrs",
        "FCGI_WEB_SERVER_ADDRS": "$FCGI_WEB_SERVER_ADDRS",
        "default": "no allowed_addrs: loopback only",
    }[allowed.source]
    if allowed.any:
        log.info("%s: accepting TCP peers from any address (%s: any)", cfg.name, source)
        if not _is_loopback(host):
            log.warning(
                "%s: any host that reaches %s can send requests and set REMOTE_USER, "
                "REMOTE_ADDR and HTTPS for the app; list the web server's addresses in "
                "allowed_addrs instead of any",
                cfg.name,
                where,
            )
        return
    log.info(
        "%s: accepting TCP peers only from %s (%s)", cfg.name, ", ".join(allowed.entries), source
    )
    if allowed.source == "default" and not _is_loopback(host):
        # The same words `start` prints (config.settings), naming both ways to allow peers.
        text = loopback_only_warning(cfg) or (
            f"{cfg.name}: listening on {where} but accepting loopback peers only: set "
            "allowed_addrs (or $FCGI_WEB_SERVER_ADDRS) to the web servers' addresses"
        )
        log.warning("%s", text)


def _serve_adopted(cfg: ServerConfig, state: ReexecState) -> int:
    setup_logging(cfg)
    listener = socket.socket(fileno=state.listen)
    control_sock = socket.socket(fileno=state.control) if state.control >= 0 else None
    if control_sock is not None:
        control_sock.set_inheritable(False)
    unix_path = state.unix_path
    identity = sockets.unix_socket_identity(unix_path) if unix_path else None
    status_listener = None
    if state.status_listen >= 0:
        status_listener = socket.socket(fileno=state.status_listen)
        status_listener.set_inheritable(False)
    loop = MasterLoop(
        cfg,
        listener,
        control_sock=control_sock,
        unix_path=unix_path,
        owns_listener=state.owns_listener,
        status_listener=status_listener,
    )
    try:
        return loop.run(adopted=state)
    finally:
        _cleanup(cfg, unix_path, identity, cfg.control_path)


def _cleanup(
    cfg: ServerConfig,
    unix_path: str | None,
    identity: tuple[int, int] | None,
    control_path: str | None,
) -> None:
    if unix_path:
        sockets.remove_unix_socket(unix_path, identity)
    if control_path:
        try:
            os.unlink(control_path)
        except OSError:
            pass
    if cfg.pidfile:
        pidfiles.remove_pidfile(cfg.pidfile, os.getpid())
    log.info("%s: master %d exited", cfg.name, os.getpid())


def _bind_control(path: str) -> socket.socket:
    if os.path.exists(path) and sockets.unix_socket_is_live(path):
        raise OSError(f"another master answers on {path}")
    return sockets.bind_unix(path, 0o600)


def _fail_early(ready_fd: int, message: str) -> None:
    log.error("%s", message)
    if ready_fd >= 0:
        try:
            os.write(ready_fd, f"fail {message}\n".encode())
        except OSError:
            pass


def _daemonize(cfg: ServerConfig) -> int:
    """Fork; the parent waits for the readiness line and exits with its outcome."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid > 0:
        os.close(w)
        data = b""
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
        text = data.decode("utf-8", "replace").strip()
        if text.startswith("ok"):
            print(f"{cfg.name}: started, master pid {pid}", flush=True)
            os._exit(0)
        reason = text[len("fail ") :] if text.startswith("fail") else "the master exited"
        print(f"{cfg.name}: failed to start: {reason}", file=sys.stderr, flush=True)
        os._exit(1)
    os.close(r)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    # A daemon has no terminal: an error log on a standard stream would write to the one it
    # was started from.
    if not cfg.error_log or is_stream(cfg.error_log):
        os.dup2(null, 2)
    os.close(null)
    return w
