"""The command line: argument parsing, one output line per server, exit codes (LSB)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fcgi_engine import __version__
from fcgi_engine.manager import Code, Outcome

if TYPE_CHECKING:
    from fcgi_engine.config.loader import Located
    from fcgi_engine.config.settings import ServerConfig, Setting


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
        if s.about.metavar or not s.about.choices:  # argparse shows choices as {a,b,c}
            options["metavar"] = s.about.metavar or _metavar(s)
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
    p.add_argument(
        "--reload",
        action="store_true",
        help="for development: roll out (as graceful does) when a source file of the app "
        "changes (*.py, *.html, *.txt, *.json under --chdir, else the app file's directory, "
        "else the current one)",
    )


def _metavar(s: Setting) -> str:
    """What a flag's value is, in its unit where it has one: --boot-timeout SECONDS."""
    by_unit = {"s": "SECONDS", "B": "BYTES", "B/s": "BYTES/S"}
    if s.about.unit in by_unit:
        return by_unit[s.about.unit]
    if s.about.path:
        return "PATH"
    if s.kinds == (int,):
        return "N"
    return s.key.upper()


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
        # "-" is a standard stream (access_log: stdout; error_log: stderr), not a file name.
        values[s.key] = os.path.abspath(value) if s.about.path and value != "-" else value
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
    p.add_argument(
        "-X", "--method", default=None, help="request method (default GET, or POST with --data)"
    )
    p.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'Name: value'",
        help="request header, sent as HTTP_NAME (repeatable)",
    )
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
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up when the response is not complete after this long (default 30 s)",
    )


def _pidfile_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pidfile",
        "-p",
        metavar="FILE",
        help="a server started by `serve --pidfile FILE`, without a config (its control socket "
        "is FILE.ctl)",
    )


def _top_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("top", help="live view of servers: workers, requests, queue, rates")
    p.add_argument("names", nargs="*", metavar="NAME", help="servers (default: all)")
    _pidfile_option(p)
    p.add_argument(
        "--interval",
        "-i",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="seconds between refreshes (default 1 s)",
    )
    p.add_argument("--once", action="store_true", help="print one frame and exit")


def _config_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config", help="print the effective settings of servers, defaults filled in (YAML)"
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="servers (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")


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
        if verb == "status":
            _pidfile_option(p)
            p.add_argument(
                "--ready",
                action="store_true",
                help="for probes: exit 0 when ready (a proven generation serves, no stop or "
                "drain running), 1 when running but not ready, 3 when not running",
            )
        if verb == "start":
            p.add_argument(
                "--wait-ready",
                action="store_true",
                help="return once each server reports ready (as `status --ready`), or exit 1 "
                "with the reason",
            )
            p.add_argument(
                "--wait-timeout",
                type=float,
                default=None,
                metavar="SECONDS",
                help="with --wait-ready: give up after this long (default: 2 x boot_timeout + 5 s)",
            )
    _top_parser(sub)
    _config_parser(sub)
    _systemd_parsers(sub)
    # Internal (what `start` runs): no help= keeps it out of the listing altogether, where
    # help=SUPPRESS would show it as "master ==SUPPRESS==".
    m = sub.add_parser("master", description="internal: run one configured server's master")
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
    "status": "show pid, generation, workers, uptime, requests, rate and listen queue",
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
    from fcgi_engine.config.loader import missing_socket_directory

    missing = missing_socket_directory(cfg.socket)
    if missing:
        print(
            f"fcgi-engine serve: --listen: the socket's directory {missing} does not exist",
            file=sys.stderr,
        )
        return Code.USAGE
    if args.reload:
        if args.daemon:
            print("fcgi-engine serve: --reload is for development, not --daemon", file=sys.stderr)
            return Code.USAGE
        from fcgi_engine import reloader

        root = reloader.watched_directory(cfg.app, cfg.chdir, os.getcwd())
        # Forked before the master opens anything: the watcher holds none of its sockets.
        reloader.fork_watcher(root, cfg.name)
        print(f"{cfg.name}: reload: watching {root} for changes", file=sys.stderr, flush=True)
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


def _systemd_parsers(sub: argparse._SubParsersAction) -> None:
    from fcgi_engine.system.units import DEFAULT_DIR

    p = sub.add_parser(
        "systemd",
        help="print (or --install) systemd units: a template for the config's servers, or "
        "one `serve` app (--app APP -- SERVE-FLAGS) with its .socket",
    )
    p.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="NAME",
        help="servers to enable as fcgi-engine@NAME (default: all)",
    )
    p.add_argument(
        "--app", metavar="APP", help="render `serve APP` instead; serve's flags follow a --"
    )
    p.add_argument(
        "--socket-group",
        default="www-data",
        metavar="GROUP",
        help="--app: group that may connect to the socket (default www-data)",
    )
    p.add_argument("--install", action="store_true", help="write the units (default: print)")
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"where --install writes ({DEFAULT_DIR})")
    p.add_argument(
        "serve_args", nargs="*", metavar="SERVE-FLAGS", help="with --app: serve's flags, after --"
    )
    r = sub.add_parser("run", help="run one configured server in the foreground (systemd)")
    r.add_argument("name", metavar="NAME", help="the server's name in the config")


def cmd_systemd(args: argparse.Namespace) -> int:
    """Render units for this installation; the logic is system/units.py."""
    from fcgi_engine.system import units

    try:
        if args.app is not None:
            serve_args = build_parser().parse_args(["serve", args.app, *args.serve_args])
            if serve_args.daemon:
                raise UsageError("--daemon: systemd runs the master in the foreground")
            rendered = units.for_app(
                serve_config(serve_args), vars(serve_args), socket_group=args.socket_group
            )
        else:
            if args.serve_args:
                raise UsageError(f"{' '.join(args.serve_args)}: serve's flags go with --app")
            loaded = _load(args)
            if isinstance(loaded, int):
                return loaded
            path, located = loaded
            rendered = units.for_config(path, [one.server for one in located], args.server)
        if not args.install:
            for unit in rendered.units:
                print(f"# ---- {unit.filename}\n{unit.text}")
            print(f"# to install, as root: add --install; then {rendered.next_steps()}")
            return Code.OK
        for written in units.install(rendered, args.dir):
            print(f"wrote {written}")
    except (UsageError, units.UnitError) as exc:
        print(f"fcgi-engine systemd: {exc}", file=sys.stderr)
        return Code.USAGE
    print(f"now run: {rendered.next_steps()}")
    return Code.OK


def cmd_run(args: argparse.Namespace) -> int:
    """Become server NAME's master, in the foreground (systemd's fcgi-engine@NAME). It execs the
    very command `start` runs, so the pidfile names it and every verb trusts it."""
    from fcgi_engine import manager

    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    path, located = loaded
    server = next((one.server for one in located if one.server.name == args.name), None)
    if server is None:
        print(f"fcgi-engine: no server named {args.name!r} in {path}", file=sys.stderr)
        return Code.USAGE
    state = manager.probe(server)
    if state.state is manager.State.RUNNING:
        print(f"fcgi-engine: {args.name}: already running (pid {state.pid})", file=sys.stderr)
        return Code.FAILURE
    if state.state is manager.State.UNKNOWN:
        print(f"fcgi-engine: {args.name}: {state.error}", file=sys.stderr)
        return Code.FAILURE
    argv = manager.master_command(path, server)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb == "serve":
        return cmd_serve(args)
    if args.verb == "request":
        return cmd_request(args)
    if args.verb == "master":
        return cmd_master(args)
    if args.verb == "systemd":
        return cmd_systemd(args)
    if args.verb == "run":
        return cmd_run(args)
    if args.verb == "top":
        return cmd_top(args)
    if args.verb == "config":
        return cmd_config(args)
    if args.verb == "status" and args.pidfile:
        return cmd_status_pidfile(args)
    if args.verb in MANAGER_VERBS:
        return cmd_manage(args)
    parser.print_help(sys.stderr)
    return Code.USAGE


def _load(args: argparse.Namespace) -> tuple[str, list[Located]] | int:
    """The config file's path and its servers, or the exit code of a config that is wrong."""
    from fcgi_engine.config.loader import ConfigError, find_config, load_located

    path = find_config(args.config)
    try:
        return path, load_located(path)
    except ConfigError as exc:
        print(f"fcgi-engine: {exc}", file=sys.stderr)
        return Code.NOT_CONFIGURED


def _select(args: argparse.Namespace) -> tuple[str, list[Located]] | int:
    """The servers NAME... select (all without names), or the exit code of a wrong name."""
    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    path, located = loaded
    known = {one.server.name: one for one in located}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        print(
            f"fcgi-engine: unknown server {', '.join(map(repr, unknown))} in {path} "
            f"(known: {', '.join(known)})",
            file=sys.stderr,
        )
        return Code.USAGE
    return path, [known[n] for n in dict.fromkeys(args.names)] if args.names else located


def _report(outcomes: Sequence[Outcome], as_json: bool) -> int:
    """One line per server (or a JSON list); the worst exit code."""
    import json

    if as_json:
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


def cmd_master(args: argparse.Namespace) -> int:
    from fcgi_engine.master.run import serve

    loaded = _load(args)
    if isinstance(loaded, int):
        return loaded
    _path, located = loaded
    matches = [one.server for one in located if one.server.name == args.name]
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
    from fcgi_engine import manager
    from fcgi_engine.config.loader import directory_problems

    selected = _select(args)
    if isinstance(selected, int):
        return selected
    path, located = selected
    verb = "graceful" if args.verb == "reload" else args.verb  # reload is graceful's alias
    refused: dict[str, Outcome] = {}
    if verb in ("check", "start", "restart"):
        # What the master would fail on before any app code runs, said by the check, located
        # in the file as config errors are; that server is refused, the others go on.
        for name, problem in directory_problems(located).items():
            refused[name] = Outcome(name, Code.NOT_CONFIGURED, f"not configured: {problem}")
    servers = [one.server for one in located if one.server.name not in refused]

    def progress(text: str) -> None:
        if not args.json:
            print(f"  ... {text}", file=sys.stderr, flush=True)

    if verb in ("start", "restart"):
        _warn_loopback_only(servers)
    if verb == "start":
        if args.wait_timeout is not None and not args.wait_ready:
            print("fcgi-engine start: --wait-timeout goes with --wait-ready", file=sys.stderr)
            return Code.USAGE
        if args.wait_timeout is not None and args.wait_timeout <= 0:
            print("fcgi-engine start: --wait-timeout must be more than 0", file=sys.stderr)
            return Code.USAGE
        outcomes = manager.start(
            path, servers, progress, wait_ready=args.wait_ready, wait_timeout=args.wait_timeout
        )
    elif verb == "stop":
        outcomes = manager.stop(servers, fast=args.fast)
    elif verb == "restart":
        outcomes = manager.restart(path, servers, progress)
    elif verb == "graceful":
        outcomes = manager.graceful(path, servers, progress)
    elif verb == "status":
        outcomes = manager.status_ready(servers) if args.ready else manager.status(servers)
    else:
        outcomes = [manager.check(s) for s in servers]
    by_name = {o.name: o for o in outcomes} | refused
    return _report([by_name[one.server.name] for one in located], args.json)


def cmd_status_pidfile(args: argparse.Namespace) -> int:
    """`status --pidfile F`: a server started by `serve --pidfile F`, no config needed."""
    from fcgi_engine import manager

    if args.names:
        print("fcgi-engine status: give NAME... or --pidfile, not both", file=sys.stderr)
        return Code.USAGE
    server = manager.server_for_pidfile(args.pidfile)
    judge = manager.ready_of if args.ready else manager.status_of
    return _report([judge(server, manager.probe(server))], args.json)


def _warn_loopback_only(servers: Sequence[ServerConfig]) -> None:
    """Say once, on the terminal that starts them, which servers listen on a network but will
    take loopback peers only (no allow-list): the master logs it too, to its log file."""
    from fcgi_engine.config.settings import loopback_only_warning

    for server in servers:
        text = loopback_only_warning(server)
        if text:
            print(f"fcgi-engine: warning: {text}", file=sys.stderr, flush=True)


def cmd_top(args: argparse.Namespace) -> int:
    from fcgi_engine import manager, top

    if args.interval <= 0:
        print("fcgi-engine top: --interval must be more than 0", file=sys.stderr)
        return Code.USAGE
    if args.pidfile:
        if args.names:
            print("fcgi-engine top: give NAME... or --pidfile, not both", file=sys.stderr)
            return Code.USAGE
        servers = [manager.server_for_pidfile(args.pidfile)]
    else:
        selected = _select(args)
        if isinstance(selected, int):
            return selected
        servers = [one.server for one in selected[1]]

    def probe_all() -> list[Outcome]:
        return [manager.status_of(s, manager.probe(s)) for s in servers]

    return top.run(probe_all, interval=args.interval, once=args.once)


def cmd_config(args: argparse.Namespace) -> int:
    """`config [NAME...]`: each server's effective settings, defaults filled in, as a config
    file that loads to the same servers (YAML), or as JSON."""
    import json

    import yaml

    selected = _select(args)
    if isinstance(selected, int):
        return selected
    servers = [effective_settings(one.server) for one in selected[1]]
    if args.json:
        print(json.dumps(servers, indent=2))
    else:
        print(yaml.safe_dump({"servers": servers}, sort_keys=False, width=100), end="")
    return Code.OK


def effective_settings(server: ServerConfig) -> dict[str, Any]:
    """Every setting of `server` in the table's order, as the YAML writes it (the socket mode
    in octal); unset ones (empty lists and mappings included) are null, which loads back as
    unset."""
    from dataclasses import asdict

    values = {k: v if v not in ([], {}) else None for k, v in asdict(server).items()}
    values["socket_mode"] = f"{server.socket_mode:04o}"
    return values
