"""A Flask app for threaded workers: a JSON view, a form POST and cookies."""

import time

from flask import Flask, jsonify, make_response, request

app = Flask(__name__)


@app.get("/api/items/<int:item>")
def item(item):
    time.sleep(float(request.args.get("wait", "0")))
    return jsonify(item=item, multithread=request.environ["wsgi.multithread"])


@app.post("/form")
def form():
    response = make_response(f"hello {request.form['name']}, {len(request.form['text'])} chars")
    response.set_cookie("visitor", request.form["name"])
    return response


@app.get("/whoami")
def whoami():
    return jsonify(visitor=request.cookies.get("visitor"))
