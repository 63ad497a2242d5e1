"""The command line: argument parsing, one output line per server, exit codes (LSB)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fcgi_engine import __version__
from fcgi_engine.manager import Code

if TYPE_CHECKING:
    from fcgi_engine.config.settings import ServerConfig


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    """`serve`'s flags: one per setting of the table (config/settings.py), plus --daemon."""
    from fcgi_engine.config.settings import SETTINGS

    p = sub.add_parser("serve", help="run one app as a FastCGI server (master + N workers)")
    for s in SETTINGS:
        if not s.flags:
            continue
        kind = next((k for k in (str, float, int) if k in s.kinds), str)  # as typed
        shown = s.shown_default()
        text = f"{s.help} (default {shown})" if shown and not s.required else s.help
        options: dict[str, Any] = {"type": kind, "help": text.replace("%", "%%")}
        if s.about.metavar:
            options["metavar"] = s.about.metavar
        if s.about.choices:
            options["choices"] = s.about.choices
        if s.positional:
            p.add_argument(s.key, **options)
        else:
            # No argparse default: a flag not given leaves the setting at ServerConfig's default.
            p.add_argument(*s.flags, dest=s.key, default=None, **options)
    p.add_argument(
        "--daemon",
        "-d",
        action="store_true",
        help="run in the background; return once the workers are ready",
    )


class UsageError(Exception):
    """A `serve` command line that cannot run; the message names the flag."""


def serve_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig that `serve` runs, checked by the same table the YAML loader uses."""
    from fcgi_engine.config.settings import SETTING_BY_KEY, SETTINGS, ServerConfig, cross_check

    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw = getattr(args, s.key, None) if s.flags else None
        if raw is None:
            continue
        try:
            value = s.check(raw)
        except ValueError as exc:
            raise UsageError(f"{s.flag}: {exc}") from None
        values[s.key] = os.path.abspath(value) if s.about.path else value
    values.setdefault("name", values["app"])
    values.setdefault("socket", "fd:0")
    problem = cross_check(values, spell=lambda key: SETTING_BY_KEY[key].flag)
    if problem:
        raise UsageError(problem[1])
    return ServerConfig(**values)


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
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
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
    if args.daemon and not args.socket:
        print("fcgi-engine serve: --daemon needs --listen ADDR", file=sys.stderr)
        return Code.USAGE
    try:
        cfg = serve_config(args)
    except UsageError as exc:
        print(f"fcgi-engine serve: {exc}", file=sys.stderr)
        return Code.USAGE
    from fcgi_engine.master.run import serve

    return serve(cfg, inherit_fd0=not args.socket, daemon=args.daemon)


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
                return Code.USAGE
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
            return Code.USAGE
        headers[name.strip()] = value.strip()
    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"fcgi-engine request: bad --param {item!r}, expected K=V", file=sys.stderr)
            return Code.USAGE
        params[key] = value
    try:
        response = request(
            args.address, args.path, method, body, headers, params, timeout=args.timeout
        )
    except (ClientError, ValueError) as exc:
        print(f"fcgi-engine request: {exc}", file=sys.stderr)
        return Code.FAILURE
    if response.protocol_status:
        print(
            f"fcgi-engine request: the application refused the request: {response.reason}",
            file=sys.stderr,
        )
        return Code.FAILURE
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
    return Code.OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb == "serve":
        return cmd_serve(args)
    if args.verb == "request":
        return cmd_request(args)
    if args.verb == "master":
        return cmd_master(args)
    if args.verb in MANAGER_VERBS:
        return cmd_manage(args)
    parser.print_help(sys.stderr)
    return Code.USAGE


def _load(args: argparse.Namespace) -> tuple[str, list[Any]] | int:
    from fcgi_engine.config.loader import ConfigError, find_config, load_config

    path = find_config(args.config)
    try:
        return path, load_config(path)
    except ConfigError as exc:
        print(f"fcgi-engine: {exc}", file=sys.stderr)
        return Code.NOT_CONFIGURED


def cmd_master(args: argparse.Namespace) -> int:
    from fcgi_engine.master.run import serve

    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    _path, servers = loaded
    matches = [s for s in servers if s.name == args.name]
    if not matches:
        print(f"fcgi-engine: no server named {args.name!r}", file=sys.stderr)
        return Code.USAGE
    server = matches[0]
    if os.path.abspath(args.pidfile) != server.pidfile:
        print(
            f"fcgi-engine: {args.name}: the config now names pidfile {server.pidfile}",
            file=sys.stderr,
        )
        return Code.NOT_CONFIGURED
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
        return Code.USAGE
    selected = [known[n] for n in dict.fromkeys(args.names)] if args.names else servers
    verb = "graceful" if args.verb == "reload" else args.verb  # reload is graceful's alias

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
    return max(codes) if codes else Code.OK
