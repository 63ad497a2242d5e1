"""A Flask app built by a factory, as gunicorn users spell it: `flask_factory:create_app(...)`.

The factory's literal arguments show up in the answers, so a test can tell that the engine
called it with them (and called it once per generation, not per request).
"""

import hashlib
import os

from flask import Flask, jsonify, request


def create_app(name="default", greeting="hello"):
    app = Flask(name)
    app.config["BUILT_IN_PID"] = os.getpid()

    @app.get("/")
    def index():
        return jsonify(
            name=app.name,
            greeting=greeting,
            built_in=app.config["BUILT_IN_PID"],
            script_name=request.script_root,
            path=request.path,
            url=request.url,
        )

    @app.post("/form")
    def form():
        return f"{greeting} {request.form['who']}, {len(request.form['text'])} chars"

    @app.post("/upload")
    def upload():
        # Streamed: a large body is hashed as it is read, never held whole.
        digest = hashlib.sha256()
        total = 0
        while chunk := request.stream.read(65536):
            digest.update(chunk)
            total += len(chunk)
        return jsonify(length=total, sha256=digest.hexdigest())

    return app
