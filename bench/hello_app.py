"""The benchmark's hello-world WSGI app (the same file for every backend)."""


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "12")])
    return [b"hello world\n"]
