"""The command line: argument parsing, one output line per server, exit codes (LSB)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from fcgi_engine import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING_STATUS = 3
EXIT_NOT_INSTALLED = 5
EXIT_NOT_CONFIGURED = 6
EXIT_NOT_RUNNING = 7


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run one app as a FastCGI server (master + N workers)")
    p.add_argument("app", help="module:callable, module, or path/to/file.py[:callable]")
    p.add_argument(
        "--listen",
        "-l",
        metavar="ADDR",
        help="unix socket path or HOST:PORT (default: fd 0 from the web server)",
    )
    p.add_argument("--nproc", "-n", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--pidfile", "-p", help="write the master's pid here")
    p.add_argument(
        "--daemon",
        "-d",
        action="store_true",
        help="run in the background; return once the workers are ready",
    )
    p.add_argument("--name", help="server name for logs (default: the app)")
    p.add_argument("--chdir", help="directory to boot the app in (re-resolved every rollout)")
    p.add_argument("--python", help="interpreter or virtualenv to boot generations with")
    p.add_argument("--health", metavar="PATH", help="path that must answer 2xx before serving")
    p.add_argument("--boot-timeout", type=float, default=30.0)
    p.add_argument("--graceful-timeout", type=float, default=30.0)
    p.add_argument("--max-requests", type=int, default=0)
    p.add_argument("--max-requests-jitter", type=int, default=0)
    p.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="kill a worker stuck this many seconds on one request (0: off)",
    )
    p.add_argument("--max-body-size", type=int, default=0)
    p.add_argument("--script-name", help="the app's mount point (SCRIPT_NAME)")
    p.add_argument("--socket-mode", default="0660", help="mode of a unix socket (default 0660)")
    p.add_argument("--error-log", help="log file (default: stderr)")
    p.add_argument("--access-log", help="access log file (one line per request)")
    p.add_argument(
        "--allowed-addrs",
        metavar="LIST",
        help="TCP peers allowed: comma-separated IPs and CIDR ranges, or any "
        "(default: $FCGI_WEB_SERVER_ADDRS, else loopback only)",
    )
    p.add_argument("--user", help="run the app as this user (when started as root)")
    p.add_argument("--group", help="run the app as this group (needs --user)")
    from fcgi_engine.config.settings import SETTING_BY_KEY

    # These flags come straight from the settings table: type, default and help declared once.
    for key in SERVE_TUNABLES:
        setting = SETTING_BY_KEY[key]
        kind = float if isinstance(setting.kind, tuple) else setting.kind
        p.add_argument(
            "--" + key.replace("_", "-"),
            type=kind,
            default=setting.default,
            help=f"{setting.help} (default {setting.default:g})",
        )


SERVE_TUNABLES = (
    "max_params_size",
    "params_timeout",
    "body_timeout",
    "body_min_rate",
    "idle_timeout",
    "send_timeout",
    "heartbeat_timeout",
    "worker_connections",
    "body_buffer_size",
)


def _request_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("request", help="send one FastCGI request (like curl, for FastCGI)")
    p.add_argument("address", metavar="ADDR", help="unix socket path or HOST:PORT")
    p.add_argument("path", nargs="?", default="/", help="path and query (default /)")
    p.add_argument("-X", "--method", default=None)
    p.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'")
    p.add_argument(
        "-d", "--data", metavar="DATA|@FILE", help="request body (@FILE reads a file, @- stdin)"
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="K=V",
        help="extra FastCGI param (overrides the defaults)",
    )
    p.add_argument("-i", "--include", action="store_true", help="print status and headers too")
    p.add_argument("-f", "--fail", action="store_true", help="exit 22 on an HTTP status >= 400")
    p.add_argument("--timeout", type=float, default=30.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcgi-engine",
        description="FastCGI application engine and process manager for Python web apps.",
    )
    parser.add_argument("--version", action="version", version=f"fcgi-engine {__version__}")
    parser.add_argument(
        "-c", "--config", help="YAML config (default: $FCGI_ENGINE_CONFIG, else ./fcgi-engine.yml)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub)
    _request_parser(sub)
    for verb, text in MANAGER_VERBS.items():
        p = sub.add_parser(verb, help=text)
        p.add_argument("names", nargs="*", metavar="NAME", help="servers (default: all)")
        p.add_argument("--json", action="store_true", help="print JSON for machines")
        if verb == "stop":
            p.add_argument("--fast", action="store_true", help="do not wait for requests")
    m = sub.add_parser("master", help=argparse.SUPPRESS)
    m.add_argument("name")
    m.add_argument("--pidfile", required=True)
    m.add_argument("--daemon", action="store_true")
    return parser


MANAGER_VERBS = {
    "start": "start servers from the config (waits until ready)",
    "stop": "stop servers (waits for in-flight requests)",
    "restart": "stop, then start (with downtime; graceful is the lossless one)",
    "graceful": "roll out new code with no lost request (starts a stopped server)",
    "reload": "same as graceful",
    "status": "show pid, workers, generation, uptime and requests served",
    "check": "validate the config and import each app in a throw-away process",
}


def cmd_serve(args: argparse.Namespace) -> int:
    from fcgi_engine.config.settings import ServerConfig, parse_allowed_addrs, parse_mode
    from fcgi_engine.master.run import serve

    if args.daemon and not args.listen:
        print("fcgi-engine serve: --daemon needs --listen ADDR", file=sys.stderr)
        return EXIT_USAGE
    if args.nproc < 1:
        print("fcgi-engine serve: --nproc must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    from fcgi_engine.config.settings import SETTING_BY_KEY

    for key in SERVE_TUNABLES:
        minimum = SETTING_BY_KEY[key].minimum
        if minimum is not None and getattr(args, key) < minimum:
            flag = "--" + key.replace("_", "-")
            print(f"fcgi-engine serve: {flag} must be at least {minimum:g}", file=sys.stderr)
            return EXIT_USAGE
    try:
        mode = parse_mode(args.socket_mode)
    except ValueError as exc:
        print(f"fcgi-engine serve: --socket-mode: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.group and not args.user:
        print(
            "fcgi-engine serve: --group needs --user (give --user root to keep root): "
            "without it the app would run as uid 0",
            file=sys.stderr,
        )
        return EXIT_USAGE
    allowed: list[str] = []
    if args.allowed_addrs is not None:
        try:
            allowed = parse_allowed_addrs(args.allowed_addrs)
        except ValueError as exc:
            print(f"fcgi-engine serve: --allowed-addrs: {exc}", file=sys.stderr)
            return EXIT_USAGE
    pidfile = os.path.abspath(args.pidfile) if args.pidfile else None
    cfg = ServerConfig(
        name=args.name or args.app,
        socket=args.listen or "fd:0",
        pidfile=pidfile,
        app=args.app,
        nproc=args.nproc,
        chdir=args.chdir,
        python=args.python,
        health=args.health,
        boot_timeout=args.boot_timeout,
        graceful_timeout=args.graceful_timeout,
        max_requests=args.max_requests,
        max_requests_jitter=args.max_requests_jitter,
        timeout=args.timeout,
        max_body_size=args.max_body_size,
        script_name=args.script_name,
        allowed_addrs=allowed,
        socket_mode=mode,
        error_log=os.path.abspath(args.error_log) if args.error_log else None,
        access_log=os.path.abspath(args.access_log) if args.access_log else None,
        user=args.user,
        group=args.group,
        **{key: getattr(args, key) for key in SERVE_TUNABLES},
    )
    return serve(cfg, inherit_fd0=not args.listen, daemon=args.daemon)


def cmd_request(args: argparse.Namespace) -> int:
    from fcgi_engine.client import ClientError, request

    body = b""
    if args.data is not None:
        if args.data == "@-":
            body = sys.stdin.buffer.read()
        elif args.data.startswith("@"):
            try:
                with open(args.data[1:], "rb") as f:
                    body = f.read()
            except OSError as exc:
                print(
                    f"fcgi-engine request: cannot read {args.data[1:]}: {exc.strerror}",
                    file=sys.stderr,
                )
                return EXIT_USAGE
        else:
            body = args.data.encode()
    method = args.method or ("POST" if args.data is not None else "GET")
    headers = {}
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            print(
                f"fcgi-engine request: bad header {item!r}, expected 'Name: value'", file=sys.stderr
            )
            return EXIT_USAGE
        headers[name.strip()] = value.strip()
    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"fcgi-engine request: bad --param {item!r}, expected K=V", file=sys.stderr)
            return EXIT_USAGE
        params[key] = value
    try:
        response = request(
            args.address, args.path, method, body, headers, params, timeout=args.timeout
        )
    except (ClientError, ValueError) as exc:
        print(f"fcgi-engine request: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if response.protocol_status:
        print(
            f"fcgi-engine request: the application refused the request: {response.reason}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    out = sys.stdout.buffer
    if args.include:
        out.write(f"HTTP/1.1 {response.status} {response.reason}\r\n".encode("latin-1"))
        for name, value in response.headers:
            out.write(f"{name}: {value}\r\n".encode("latin-1"))
        out.write(b"\r\n")
    out.write(response.body)
    out.flush()
    if response.stderr:
        sys.stderr.write(response.stderr.decode("utf-8", "replace"))
    if args.fail and response.status >= 400:
        print(f"fcgi-engine request: HTTP {response.status} {response.reason}", file=sys.stderr)
        return 22
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "request":
        return cmd_request(args)
    if args.command == "master":
        return cmd_master(args)
    if args.command in MANAGER_VERBS:
        return cmd_manage(args)
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _load(args: argparse.Namespace) -> tuple[str, list[Any]] | int:
    from fcgi_engine.config.loader import ConfigError, find_config, load_config

    path = find_config(args.config)
    try:
        return path, load_config(path)
    except ConfigError as exc:
        print(f"fcgi-engine: {exc}", file=sys.stderr)
        return EXIT_NOT_CONFIGURED


def cmd_master(args: argparse.Namespace) -> int:
    from fcgi_engine.master.run import serve

    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    _path, servers = loaded
    matches = [s for s in servers if s.name == args.name]
    if not matches:
        print(f"fcgi-engine: no server named {args.name!r}", file=sys.stderr)
        return EXIT_USAGE
    server = matches[0]
    if os.path.abspath(args.pidfile) != server.pidfile:
        print(
            f"fcgi-engine: {args.name}: the config now names pidfile {server.pidfile}",
            file=sys.stderr,
        )
        return EXIT_NOT_CONFIGURED
    return serve(server, daemon=args.daemon)


def cmd_manage(args: argparse.Namespace) -> int:
    import json

    from fcgi_engine import manager

    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    path, servers = loaded
    known = {s.name: s for s in servers}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        print(
            f"fcgi-engine: unknown server {', '.join(map(repr, unknown))} in {path} "
            f"(known: {', '.join(known)})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    selected = [known[n] for n in dict.fromkeys(args.names)] if args.names else servers
    verb = "graceful" if args.command == "reload" else args.command

    def progress(text: str) -> None:
        if not args.json:
            print(f"  ... {text}", file=sys.stderr, flush=True)

    if verb == "start":
        outcomes = manager.start(path, selected, progress)
    elif verb == "stop":
        outcomes = manager.stop(selected, fast=args.fast)
    elif verb == "restart":
        outcomes = manager.restart(path, selected, progress)
    elif verb == "graceful":
        outcomes = manager.graceful(path, selected, progress)
    elif verb == "status":
        outcomes = manager.status(selected)
    else:
        outcomes = [manager.check(s) for s in selected]
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": o.name,
                        "ok": o.ok,
                        "code": int(o.code),
                        "message": o.message,
                        "detail": o.detail,
                        **o.data,
                    }
                    for o in outcomes
                ],
                indent=2,
                default=str,
            )
        )
    else:
        for o in outcomes:
            print(f"{o.name}: {o.message}", flush=True)
            if o.detail and not o.ok:
                for line in o.detail.splitlines()[-15:]:
                    print(f"    {line}", file=sys.stderr)
    codes = [int(o.code) for o in outcomes if o.code]
    return max(codes) if codes else EXIT_OK
