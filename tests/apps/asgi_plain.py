"""A plain ASGI 3 callable (no framework) with one endpoint per behaviour the tests check.

Lifespan: startup puts `started` in the state; with $ASGI_FAIL_STARTUP set it fails instead.
"""

import asyncio
import hashlib
import json
import os
import time
from urllib.parse import parse_qs


def _rss_kb(field="VmHWM:"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


async def _lifespan(scope, receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if os.environ.get("ASGI_FAIL_STARTUP"):
                await send({"type": "lifespan.startup.failed", "message": "database is down"})
                return
            scope["state"]["started"] = os.getpid()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            mark = os.environ.get("ASGI_SHUTDOWN_MARK")
            if mark:
                with open(mark, "a") as f:
                    f.write(f"{os.getpid()}\n")
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _text(send, body, status=200, ctype=b"text/plain"):
    data = body.encode() if isinstance(body, str) else body
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", ctype), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await _lifespan(scope, receive, send)
    path = scope["path"]
    q = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    if path in ("/", "/hello", "/healthz"):
        return await _text(send, "hello world\n")
    if path == "/sleep":
        await asyncio.sleep(float(q.get("s", "0.5")))
        return await _text(send, "slept\n")
    if path == "/scope":
        out = {
            k: (v.decode("latin-1") if isinstance(v, bytes) else v)
            for k, v in scope.items()
            if k not in ("headers", "state")
        }
        out["headers"] = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
        out["state"] = dict(scope.get("state", {}))
        return await _text(send, json.dumps(out), ctype=b"application/json")
    if path == "/echo":
        digest = hashlib.sha256()
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            digest.update(message.get("body", b""))
            total += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        return await _text(send, f"{total} {digest.hexdigest()} {_rss_kb()}\n")
    if path == "/block":
        # Blocks the event loop itself, as a careless sync call in an async view does.
        time.sleep(float(q.get("s", "30")))
        return await _text(send, "unblocked\n")
    if path == "/rss":
        return await _text(send, f"{_rss_kb('VmRSS:')} {_rss_kb()}\n")
    if path == "/stream":
        n, delay = int(q.get("n", "5")), float(q.get("delay", "0.3"))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        for i in range(n):
            await send(
                {"type": "http.response.body", "body": f"chunk {i}\n".encode(), "more_body": True}
            )
            await asyncio.sleep(delay)
        await send({"type": "http.response.body", "body": b"done\n"})
        return
    if path == "/error":
        raise RuntimeError("boom before the response")
    if path == "/error-after":
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"100")],
            }
        )
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("boom after the response started")
    if path == "/disconnect":
        # Read the body, then wait for the web server to go away; note it in the mark file.
        while (await receive()).get("more_body"):
            pass
        message = await asyncio.wait_for(receive(), 30)
        with open(q["mark"], "w") as f:
            f.write(message["type"])
        return
    return await _text(send, "not found\n", status=404)
