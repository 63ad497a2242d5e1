"""Find and import the app (WSGI or ASGI) named by an APP spec: `module:callable`, `module`
(callable `application`), `file.py[:callable]` or `module:factory(literal args)`."""

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
    """`module:callable`, `module`, `file.py[:callable]`, `module:factory(args)` -> (module or
    path, callable name or factory call)."""
    # A factory's arguments may hold a colon: split at the last one before them.
    head = spec.split("(", 1)[0]
    target, sep, name = head.rpartition(":")
    if not sep or "/" in name or name.endswith(".py"):
        target, name = spec, "application"
    else:
        name += spec[len(head) :]
    if not target:
        raise AppLoadError(f"invalid app spec {spec!r}: expected module:callable or file.py")
    return target, name or "application"


def is_file_spec(target: str) -> bool:
    """A path (it has a slash, or it is a .py or .wsgi file that exists here), not a dotted
    module: Django's `mysite.wsgi` is a module unless a file of that name is in the directory."""
    if os.sep in target:
        return True
    if not target.endswith((".py", ".wsgi")):
        return False
    return os.path.isfile(target) or not _is_dotted_name(target)


def _is_dotted_name(text: str) -> bool:
    return all(part.isidentifier() for part in text.split("."))


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
    if "(" in name:
        app = _call_factory(module, target, name)
    else:
        app = getattr(module, name, None)
        if app is None:
            raise AppLoadError(f"{target!r} defines no {name!r}")
    if not callable(app):
        raise AppLoadError(f"{target}:{name} is not callable")
    return app


def _call_factory(module: Any, target: str, call: str) -> Any:
    """`create_app()` or `create_app("prod", debug=True)`: call the module's factory with
    literal arguments (as gunicorn does) and return what it builds."""
    import ast

    try:
        tree = ast.parse(call, mode="eval").body
        if not isinstance(tree, ast.Call) or not isinstance(tree.func, ast.Name):
            raise ValueError("not a call of a name")
        args = [ast.literal_eval(arg) for arg in tree.args]
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in tree.keywords if kw.arg}
        if len(kwargs) != len(tree.keywords):
            raise ValueError("**kwargs is not a literal argument")
    except (SyntaxError, ValueError) as exc:
        raise AppLoadError(
            f"{call!r} is not a factory call with literal arguments, like create_app() or "
            f"create_app('prod', debug=True): {exc}"
        ) from None
    factory = getattr(module, tree.func.id, None)
    if factory is None:
        raise AppLoadError(f"{target!r} defines no {tree.func.id!r}")
    try:
        return factory(*args, **kwargs)
    except BaseException as exc:
        raise AppLoadError(f"{target}:{call} failed: {exc!r}") from exc


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
