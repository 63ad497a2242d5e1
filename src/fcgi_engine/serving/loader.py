"""Find and import the WSGI callable named by an APP spec."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

WSGIApp = Callable[..., Any]


class AppLoadError(Exception):
    """The app could not be found or imported; the message names what and why."""


def split_app_spec(spec: str) -> tuple[str, str]:
    """`module:callable`, `module`, `file.py[:callable]` -> (module or path, callable name)."""
    target, sep, name = spec.rpartition(":")
    if not sep or "/" in name or name.endswith(".py"):
        target, name = spec, "application"
    if not target:
        raise AppLoadError(f"invalid app spec {spec!r}: expected module:callable or file.py")
    return target, name or "application"


def is_file_spec(target: str) -> bool:
    return target.endswith((".py", ".wsgi")) or os.sep in target


def load_app(spec: str) -> WSGIApp:
    """Import the app once. Errors raise AppLoadError with the cause chained."""
    target, name = split_app_spec(spec)
    if is_file_spec(target):
        module = _import_file(target)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            if exc.name and target.startswith(exc.name):
                raise AppLoadError(f"no module named {exc.name!r} (app {spec!r})") from exc
            raise AppLoadError(f"importing {target!r} failed: {exc!r}") from exc
        except BaseException as exc:
            raise AppLoadError(f"importing {target!r} failed: {exc!r}") from exc
    app = getattr(module, name, None)
    if app is None:
        raise AppLoadError(f"{target!r} defines no {name!r}")
    if not callable(app):
        raise AppLoadError(f"{target}:{name} is not callable")
    return app


def _import_file(path: str) -> Any:
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise AppLoadError(f"app file {path} does not exist")
    directory = os.path.dirname(path)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    module_name = "_fcgi_engine_app_" + os.path.splitext(os.path.basename(path))[0].replace(
        "-", "_"
    ).replace(".", "_")
    # A .wsgi file has no .py suffix: name the loader explicitly.
    from importlib.machinery import SourceFileLoader

    loader = SourceFileLoader(module_name, path)
    spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
    if spec is None:
        raise AppLoadError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        raise AppLoadError(f"importing {path} failed: {exc!r}") from exc
    return module


def is_asgi(app: Any) -> bool:
    """An ASGI 3 app is an async callable `app(scope, receive, send)`: a coroutine function, or
    an object whose `__call__` is one (Starlette, FastAPI, Django's ASGIHandler)."""
    if inspect.iscoroutinefunction(app):
        return True
    call = getattr(app, "__call__", None)  # noqa: B004 - the method itself is what we inspect
    return call is not None and inspect.iscoroutinefunction(call)


def resolve_interface(app: Any, wanted: str, spec: str) -> str:
    """ "wsgi" or "asgi" for the `interface` setting (auto, wsgi or asgi) and this app; an
    AppLoadError says why an app cannot be called the way it was asked to be."""
    asgi = is_asgi(app)
    if wanted == "auto":
        return "asgi" if asgi else "wsgi"
    if wanted == "asgi" and not asgi:
        raise AppLoadError(
            f"{spec} is not an ASGI 3 app (an async callable app(scope, receive, send)); "
            "remove interface: asgi to serve it as WSGI"
        )
    if wanted == "wsgi" and asgi:
        raise AppLoadError(
            f"{spec} is an async callable (ASGI); remove interface: wsgi to serve it as ASGI"
        )
    return wanted
