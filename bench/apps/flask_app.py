"""The Flask benchmark app (the same file for every backend): `/json`, a JSON view over a
small dict, and `/page`, a Jinja template rendering a 20-row table.

    fcgi-engine serve bench/apps/flask_app.py:app
"""

from __future__ import annotations

from pathlib import Path

from flask import Flask, jsonify, render_template

app = Flask(__name__, template_folder=str(Path(__file__).resolve().parent / "templates"))
application = app

ROWS = [{"id": n, "name": f"item {n}", "price": n * 1.25} for n in range(20)]


@app.route("/json")
def as_json():  # type: ignore[no-untyped-def]
    return jsonify(status="ok", count=len(ROWS), items=ROWS[:5])


@app.route("/page")
def page():  # type: ignore[no-untyped-def]
    return render_template("page.html", title="Flask page", rows=ROWS)
