"""FastCGI params -> a PEP 3333 environ, with every web-server quirk normalised here."""

from __future__ import annotations

from typing import Any

_DROP = ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH")


def build_environ(
    params: dict[str, str],
    wsgi_input: Any,
    errors: Any,
    script_name: str | None = None,
) -> dict[str, Any]:
    """The environ for one request.

    `script_name` is the app's mount point when configured; otherwise the app is taken to be
    mounted at the root, which is what nginx's stock fastcgi_params mean.
    """
    # The params dict is fresh for every request: it becomes the environ (no copy).
    environ: dict[str, Any] = params
    scheme = normalise_params(environ, script_name)
    environ["wsgi.version"] = (1, 0)
    environ["wsgi.url_scheme"] = scheme
    environ["wsgi.input"] = wsgi_input
    # The end of the body is always known from the empty STDIN record, CONTENT_LENGTH or not.
    environ["wsgi.input_terminated"] = True
    environ["wsgi.errors"] = errors
    environ["wsgi.multithread"] = False
    environ["wsgi.multiprocess"] = True
    environ["wsgi.run_once"] = False
    return environ


def normalise_params(environ: dict[str, Any], script_name: str | None = None) -> str:
    """Normalise FastCGI params in place, as both the WSGI environ and the ASGI scope see them:
    the CGI defaults, SERVER_NAME/SERVER_PORT, SCRIPT_NAME/PATH_INFO split at the mount point
    (`script_name`, else the root). Returns the URL scheme, "http" or "https"."""
    for key in _DROP:
        if key in environ:
            del environ[key]
    for key in ("CONTENT_LENGTH", "CONTENT_TYPE"):
        if key in environ and not environ[key].strip():
            del environ[key]
    if "REQUEST_METHOD" not in environ:
        environ["REQUEST_METHOD"] = "GET"
    if "QUERY_STRING" not in environ:
        environ["QUERY_STRING"] = ""
    if "SERVER_PROTOCOL" not in environ:
        environ["SERVER_PROTOCOL"] = "HTTP/1.1"

    https = environ.get("HTTPS")
    if https and https.lower() in ("on", "1", "yes", "true"):
        scheme = "https"
    else:
        scheme = environ.get("REQUEST_SCHEME", "http").lower()
        if scheme not in ("http", "https"):
            scheme = "http"
    if not environ.get("SERVER_NAME") or not environ.get("SERVER_PORT"):
        _normalise_server(environ, scheme)
    path = environ.get("PATH_INFO")
    if script_name is not None or not path or path[0] != "/" or environ.get("SCRIPT_NAME", "x"):
        _normalise_paths(environ, script_name)

    return scheme


def _normalise_server(environ: dict[str, Any], scheme: str) -> None:
    host = environ.get("HTTP_HOST", "")
    if not environ.get("SERVER_NAME"):
        environ["SERVER_NAME"] = _host_without_port(host) or "localhost"
    if not environ.get("SERVER_PORT"):
        port = ""
        if host and not host.endswith("]") and ":" in host:
            port = host.rsplit(":", 1)[1]
        environ["SERVER_PORT"] = port if port.isdigit() else ("443" if scheme == "https" else "80")


def _host_without_port(host: str) -> str:
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.split(":", 1)[0]


def _normalise_paths(environ: dict[str, Any], mount: str | None) -> None:
    script = environ.get("SCRIPT_NAME", "")
    path = environ.get("PATH_INFO", "")
    if "IIS" in environ.get("SERVER_SOFTWARE", "") and script and path.startswith(script):
        # IIS puts the whole path in PATH_INFO.
        path = path[len(script) :]
    elif not path:
        # nginx's stock params and lighttpd mounted at "/" put the whole path in SCRIPT_NAME.
        path, script = script, ""
        if not path:
            path = environ.get("DOCUMENT_URI") or environ.get("REQUEST_URI", "").split("?", 1)[0]
    if mount is not None:
        mount = mount.rstrip("/")
        full = script + path
        if mount and (full == mount or full.startswith(mount + "/")):
            script, path = mount, full[len(mount) :]
        else:
            script, path = "", full
    if script == "/":
        script = ""
    if path and not path.startswith("/"):
        path = "/" + path
    environ["SCRIPT_NAME"] = script
    environ["PATH_INFO"] = path
