"""The server's status as the status page shows it: JSON (the snapshot itself) or OpenMetrics.

The snapshot is what MasterPolicy.snapshot builds, what `fcgi-engine status --json` prints and
what the control StatusResponse carries. Times named "_at" are wall clock (seconds since the
epoch); "age", "uptime" and "running_for" are durations in seconds. Keys are only ever added:
a reader must tolerate a missing key (an older master) and ignore one it does not know.

    {
      "pid": 1234,                       the master's
      "started_at": 1700000000.123,      when the master started (kept across a USR2 re-exec)
      "name": "api", "listen": "127.0.0.1:9000" | "/run/api.sock",
      "state": "starting" | "running" | "stopping",
      "generation": 3 | null,            the active generation
      "booting": 4 | null, "nproc": 2, "workers_ready": 2, "requests": 17, "uptime": 12.5,
      "workers": [                       the active generation's
        {"pid": 11, "state": "idle" | "busy" | "draining", "requests": 9,
         "started": 1.5,                 (the generation's monotonic clock: ignore it)
         "started_at": 1700000001.0 | null,
         "request": {"method": "GET", "uri": "/slow?x=1", "running_for": 2.125} | null,
         "in_flight": 1}                 (present when non-zero)
      ],
      "generations": [{"id": 3, "phase": "booting" | "active" | "draining" | "failed",
                       "age": 5.0, "started_at": 1700000005.0, "workers": [...], "pids": [...]}],
      "last_rollout": {...} | null, "rollout_queued": false,
      "metrics": {
        "requests": {"1xx": 0, "2xx": 15, "3xx": 0, "4xx": 1, "5xx": 1, "none": 0},
                                         requests ended since the master started, by status
                                         class ("none": no response was started)
        "requests_per_second": 2.5,      over the last 10 s
        "in_flight": 1,                  requests running now, every generation
        "duration": {"buckets": [[0.005, 3], [0.01, 9], ..., [10.0, 17], ["+Inf", 17]],
                     "sum": 1.25, "count": 17},
                                         cumulative counts of requests that took at most
                                         `le` seconds (Prometheus' histogram)
        "listen_queue": {"now": 0 | null, "max": 18 | null, "limit": 128 | null},
                                         connections waiting in the kernel's accept queue,
                                         now and the most seen; null where not measurable
        "restarts": {"crash": 0, "max_requests": 2, "timeout": 0, "memory": 1},
        "rollouts": {"rolled_out": 3, "rolled_back": 1}
      }
    }

`render_openmetrics` turns the same snapshot into the OpenMetrics text format (what
Prometheus scrapes), every sample labelled with the server's name:

    fcgi_engine_requests_total{class}               counter
    fcgi_engine_request_duration_seconds            histogram
    fcgi_engine_in_flight_requests                  gauge
    fcgi_engine_listen_queue_length                 gauge (absent where not measurable)
    fcgi_engine_listen_queue_max                    gauge (idem)
    fcgi_engine_workers{state}                      gauge: idle, busy, draining
    fcgi_engine_worker_restarts_total{cause}        counter
    fcgi_engine_rollouts_total{outcome}             counter
    fcgi_engine_generation                          gauge: the active generation
    fcgi_engine_generation_start_time_seconds       gauge: when it started (wall clock)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

JSON_TYPE = "application/json"
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def wants_openmetrics(query_string: str, accept: str) -> bool:
    """The status page is asked for OpenMetrics: `openmetrics` in the query string (a bare
    word or a key), or an Accept header naming application/openmetrics-text."""
    if any(
        key == "openmetrics" or value == "openmetrics"
        for key, value in parse_qsl(query_string, keep_blank_values=True)
    ):
        return True
    return "application/openmetrics-text" in accept.lower()


def render_json(snapshot: dict[str, Any]) -> bytes:
    return json.dumps(snapshot, indent=1, sort_keys=True).encode() + b"\n"


def render(snapshot: dict[str, Any], openmetrics: bool) -> tuple[str, bytes]:
    """The status page: its Content-Type and body."""
    if openmetrics:
        return OPENMETRICS_TYPE, render_openmetrics(snapshot).encode()
    return JSON_TYPE, render_json(snapshot)


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float | int) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Family:
    """One metric family's lines: TYPE, UNIT, HELP and its samples."""

    def __init__(self, name: str, kind: str, help_text: str, unit: str = "") -> None:
        self.lines = [f"# TYPE {name} {kind}"]
        if unit:
            self.lines.append(f"# UNIT {name} {unit}")
        self.lines.append(f"# HELP {name} {help_text}")
        self.name = name

    def sample(self, suffix: str, labels: dict[str, str], value: float | int) -> None:
        inner = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
        self.lines.append(f"{self.name}{suffix}{{{inner}}} {_number(value)}")


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def render_openmetrics(snapshot: dict[str, Any]) -> str:
    """The snapshot as OpenMetrics text, ending in `# EOF`."""
    server = {"server": str(snapshot.get("name", ""))}
    metrics: dict[str, Any] = snapshot.get("metrics") or {}
    families: list[_Family] = []

    def family(name: str, kind: str, help_text: str, unit: str = "") -> _Family:
        f = _Family(name, kind, help_text, unit)
        families.append(f)
        return f

    requests = family(
        "fcgi_engine_requests",
        "counter",
        "Requests ended, by HTTP status class (none: no response).",
    )
    for cls, n in (metrics.get("requests") or {}).items():
        requests.sample("_total", {**server, "class": str(cls)}, _int(n))

    duration = metrics.get("duration") or {}
    hist = family(
        "fcgi_engine_request_duration_seconds",
        "histogram",
        "Time from a complete request to its end.",
        "seconds",
    )
    buckets = duration.get("buckets") or [["+Inf", 0]]
    for bound, cumulative in buckets:
        le = "+Inf" if bound == "+Inf" else _number(float(bound))
        hist.sample("_bucket", {**server, "le": le}, _int(cumulative))
    hist.sample("_count", server, _int(duration.get("count", 0)))
    hist.sample("_sum", server, float(duration.get("sum", 0.0) or 0.0))

    family("fcgi_engine_in_flight_requests", "gauge", "Requests running now.").sample(
        "", server, _int(metrics.get("in_flight", 0))
    )

    queue = metrics.get("listen_queue") or {}
    now = family(
        "fcgi_engine_listen_queue_length",
        "gauge",
        "Connections waiting in the listening socket's accept queue.",
    )
    if queue.get("now") is not None:
        now.sample("", server, _int(queue["now"]))
    most = family(
        "fcgi_engine_listen_queue_max",
        "gauge",
        "The most connections seen waiting in the accept queue since the master started.",
    )
    if queue.get("max") is not None:
        most.sample("", server, _int(queue["max"]))

    workers = family("fcgi_engine_workers", "gauge", "Worker processes, by state.")
    for state, n in _worker_states(snapshot).items():
        workers.sample("", {**server, "state": state}, n)

    restarts = family("fcgi_engine_worker_restarts", "counter", "Workers replaced, by cause.")
    for cause, n in (metrics.get("restarts") or {}).items():
        restarts.sample("_total", {**server, "cause": str(cause)}, _int(n))

    rollouts = family("fcgi_engine_rollouts", "counter", "Rollouts, by outcome.")
    for outcome, n in (metrics.get("rollouts") or {}).items():
        rollouts.sample("_total", {**server, "outcome": str(outcome)}, _int(n))

    generation = family("fcgi_engine_generation", "gauge", "The generation serving.")
    started = family(
        "fcgi_engine_generation_start_time_seconds",
        "gauge",
        "When the generation serving started, in seconds since the epoch.",
        "seconds",
    )
    active = snapshot.get("generation")
    if isinstance(active, int):
        generation.sample("", server, active)
        for gen in snapshot.get("generations") or []:
            if gen.get("id") == active and isinstance(gen.get("started_at"), (int, float)):
                started.sample("", server, float(gen["started_at"]))
    return "\n".join(_lines(families)) + "\n# EOF\n"


def _lines(families: Iterable[_Family]) -> Iterable[str]:
    for f in families:
        yield from f.lines


def _worker_states(snapshot: dict[str, Any]) -> dict[str, int]:
    """Workers of every generation by state; those of a generation that is not the active one
    are draining (or booting: not counted)."""
    states = {"idle": 0, "busy": 0, "draining": 0}
    active = snapshot.get("generation")
    gens = snapshot.get("generations")
    if gens is None:
        gens = [{"id": active, "phase": "active", "workers": snapshot.get("workers") or []}]
    for gen in gens:
        if gen.get("phase") == "draining":
            states["draining"] += len(gen.get("workers") or [])
        elif gen.get("id") == active:
            for worker in gen.get("workers") or []:
                state = worker.get("state")
                if state in states:
                    states[state] += 1
    return states
