"""A WSGI app for threaded workers: /wait?s=SECONDS waits, then tells which process and
thread served it and whether wsgi.multithread was set."""

import json
import os
import threading
import time
from urllib.parse import parse_qs


def application(environ, start_response):
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if environ["PATH_INFO"] == "/wait":
        time.sleep(float(query.get("s", ["0"])[0]))
    body = json.dumps(
        {
            "pid": os.getpid(),
            "thread": threading.get_ident(),
            "multithread": environ["wsgi.multithread"],
            "path": environ["PATH_INFO"],
        }
    ).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]
