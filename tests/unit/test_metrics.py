"""Metrics from the worker's slot to the status page: the scoreboard's counters, the status
hand-over message, the policy's totals across generations and rollouts, and the JSON and
OpenMetrics renderings (checked with Prometheus' own parser)."""

from __future__ import annotations

import socket

from prometheus_client.openmetrics.parser import text_string_to_metric_families

from fcgi_engine import channel, metrics
from fcgi_engine.channel import CurrentRequest, RequestCounts, WorkerInfo
from fcgi_engine.master import policy as P
from fcgi_engine.protocol import Connection, RequestReady, StdinEnd, encode_name_values
from fcgi_engine.serving.scoreboard import DURATION_BUCKETS, InFlight, Scoreboard
from fcgi_engine.status_pass import pass_status_request, receive_status_pass, request_path


def test_the_scoreboard_counts_by_class_and_duration_bucket() -> None:
    board = Scoreboard(2)
    board.reset(1, pid=7)
    for status, duration in [(200, 0.001), (200, 0.3), (404, 0.01), (503, 20.0), (0, 0.0)]:
        board.record(1, status, duration)
    state = board.read(1)
    assert state.by_class == (0, 2, 0, 1, 1, 1)
    assert len(state.buckets) == len(DURATION_BUCKETS) + 1
    # 0.001 and 0.0 in the first bucket, 0.01 at its bound, 0.3 under 0.5, 20 s above them all.
    assert state.buckets[0] == 2 and state.buckets[1] == 1
    assert state.buckets[DURATION_BUCKETS.index(0.5)] == 1 and state.buckets[-1] == 1
    assert abs(state.duration_sum - 20.311) < 1e-9
    # The neighbour is untouched; a reset zeroes the counters for the next worker.
    assert board.read(0).by_class == (0,) * 6
    board.reset(1, pid=8)
    assert board.read(1).by_class == (0,) * 6 and board.read(1).duration_sum == 0.0


def test_in_flight_shows_the_oldest_request_and_records_each_end() -> None:
    board = Scoreboard(1)
    flight = InFlight(board, 0)
    first = flight.begin("GET", "/first?x=1")
    second = flight.begin("POST", "/second")
    state = board.read(0)
    assert (state.busy, state.method, state.path, state.in_flight) == (True, "GET", "/first?x=1", 2)
    flight.end(first, 200, 0.02)
    state = board.read(0)
    assert (state.method, state.path, state.in_flight, state.requests) == ("POST", "/second", 1, 1)
    flight.end(second, 500, 1.5)
    state = board.read(0)
    assert not state.busy and state.by_class == (0, 1, 0, 0, 1, 0) and state.in_flight == 0


def test_a_status_request_passes_with_what_rebuilds_it() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    conn, peer = socket.socketpair()
    with ours, theirs, conn, peer:
        params = encode_name_values(
            [(b"REQUEST_URI", b"/s?openmetrics"), (b"QUERY_STRING", b"openmetrics")]
        )
        pass_status_request(
            ours, conn, 3, True, params, False, [1, 2], b"\x01\x05\x00\x03\x00\x00\x00\x00"
        )
        theirs.setblocking(False)
        passed = receive_status_pass(theirs)
        assert passed is not None and passed.sock is not None
        with passed.sock:
            assert (passed.request_id, passed.keep_conn, passed.stdin_done, passed.ended) == (
                3,
                True,
                False,
                [1, 2],
            )
            # The descriptor is the same connection.
            passed.sock.sendall(b"ping")
            assert peer.recv(4) == b"ping"
        proto = Connection(ended=passed.ended)
        proto.receive_data(passed.replay())
        ready = proto.next_event()
        assert isinstance(ready, RequestReady) and ready.keep_conn
        assert request_path(ready.params) == "/s"
        assert proto.next_event() == StdinEnd(3)
        assert receive_status_pass(theirs) is None


def test_the_status_path_is_compared_as_the_web_server_sent_it() -> None:
    assert request_path({"SCRIPT_NAME": "", "PATH_INFO": "/fcgi-status"}) == "/fcgi-status"
    assert request_path({"SCRIPT_NAME": "/fcgi-status"}) == "/fcgi-status"
    assert request_path({"DOCUMENT_URI": "/a", "REQUEST_URI": "/b?x"}) == "/a"
    assert request_path({"REQUEST_URI": "/b?x"}) == "/b"


def test_openmetrics_is_asked_by_query_or_accept_header() -> None:
    assert metrics.wants_openmetrics("openmetrics", "")
    assert metrics.wants_openmetrics("a=1&openmetrics=1", "")
    assert metrics.wants_openmetrics("", "application/openmetrics-text; version=1.0.0")
    assert not metrics.wants_openmetrics("format=json", "application/json")


def _counts(ok: int, errors: int, slow: int = 0) -> RequestCounts:
    buckets = [0] * channel.N_BUCKETS
    buckets[0] = ok + errors
    buckets[-1] = slow
    return RequestCounts(
        (0, ok + slow, 0, 0, errors, 0), tuple(buckets), 0.5 * (ok + errors) + 30 * slow
    )


def _running(pol: P.MasterPolicy) -> None:
    pol.handle(P.Started(0.0, wall=1000.0))
    pol.handle(P.GenerationReady(1, 1.0, [11], [WorkerInfo(11, "idle", 0, 1.0)]))


def test_totals_never_go_backwards_across_a_rollout_and_rollouts_are_counted() -> None:
    pol = P.MasterPolicy(P.Settings("api", 1, pid=42))
    _running(pol)
    pol.handle(P.GenerationStatus(1, 2.0, [], _counts(5, 1), {"crash": 1}))
    assert pol.snapshot(2.0)["metrics"]["requests"]["2xx"] == 5
    pol.handle(P.SignalReceived(1, 3.0))  # HUP
    pol.handle(P.GenerationReady(2, 4.0, [12], [WorkerInfo(12, "idle", 0, 4.0)]))
    pol.handle(P.GenerationStatus(1, 4.5, [], _counts(7, 1), {"crash": 1}))
    pol.handle(P.GenerationStatus(2, 4.5, [], _counts(2, 0, slow=1), {"max_requests": 2}))
    pol.handle(P.GenerationExited(1, 5.0, 0))
    m = pol.snapshot(6.0)["metrics"]
    assert m["requests"] == {"1xx": 0, "2xx": 10, "3xx": 0, "4xx": 0, "5xx": 1, "none": 0}
    assert m["restarts"] == {"crash": 1, "max_requests": 2, "timeout": 0, "memory": 0}
    assert m["rollouts"] == {"rolled_out": 1, "rolled_back": 0}
    assert m["duration"]["count"] == 11 and m["duration"]["buckets"][-1] == ["+Inf", 11]
    assert m["duration"]["buckets"][0] == [0.005, 10]
    # A rollout that fails is rolled back, and counted so.
    pol.handle(P.SignalReceived(1, 7.0))
    pol.handle(P.GenerationFailed(3, 8.0, "ImportError"))
    assert pol.snapshot(8.0)["metrics"]["rollouts"] == {"rolled_out": 1, "rolled_back": 1}


def test_the_rate_spans_recent_statuses_and_the_queue_keeps_its_maximum() -> None:
    pol = P.MasterPolicy(P.Settings("api", 1))
    _running(pol)
    for i in range(21):
        now = 2.0 + i * 0.5
        pol.handle(P.GenerationStatus(1, now, [], _counts(i * 5, 0)))
    # 10 requests a second over the last 10 s.
    assert abs(pol.snapshot(12.0)["metrics"]["requests_per_second"] - 10.0) < 0.6
    pol.handle(P.ListenQueueSampled(12.0, 18, 128))
    pol.handle(P.ListenQueueSampled(12.1, 2, 128))
    assert pol.snapshot(12.2)["metrics"]["listen_queue"] == {"now": 2, "max": 18, "limit": 128}
    pol.handle(P.ListenQueueSampled(12.3, None, None))
    assert pol.snapshot(12.4)["metrics"]["listen_queue"] == {"now": None, "max": 18, "limit": None}


def test_the_snapshot_gives_wall_clock_times_and_the_current_request() -> None:
    pol = P.MasterPolicy(P.Settings("api", 1, pid=42))
    _running(pol)
    busy = WorkerInfo(11, "busy", 3, 1.0, 1001.0, CurrentRequest("GET", "/slow?s=3", 1001.5), 1)
    pol.handle(P.GenerationStatus(1, 2.0, [busy]))
    snap = pol.snapshot(4.0)
    assert snap["pid"] == 42 and snap["started_at"] == 1000.0
    assert snap["generations"][0]["started_at"] == 1000.0
    [worker] = snap["workers"]
    assert worker["started_at"] == 1001.0
    assert worker["request"] == {"method": "GET", "uri": "/slow?s=3", "running_for": 2.5}
    assert snap["metrics"]["in_flight"] == 1


def test_the_totals_survive_a_reexec_of_the_master() -> None:
    pol = P.MasterPolicy(P.Settings("api", 1))
    _running(pol)
    pol.handle(P.GenerationStatus(1, 2.0, [], _counts(4, 0)))
    pol.handle(P.GenerationExited(1, 3.0, 0))
    pol.handle(P.ListenQueueSampled(3.0, 9, 128))
    wire = pol.metrics.to_wire()
    again = P.MasterPolicy(P.Settings("api", 1))
    again.handle(P.Adopted(50.0, [], active=None, next_id=2, nproc=1, wall=2000.0, metrics=wire))
    snap = again.snapshot(51.0)
    assert snap["metrics"]["requests"]["2xx"] == 4 and snap["started_at"] == 1000.0
    assert snap["metrics"]["listen_queue"]["max"] == 9


def test_openmetrics_parses_with_prometheus_and_says_what_the_json_says() -> None:
    pol = P.MasterPolicy(P.Settings('a "quoted" server', 2))
    _running(pol)
    pol.handle(
        P.GenerationStatus(
            1,
            2.0,
            [WorkerInfo(11, "busy", 3, 1.0), WorkerInfo(12, "idle", 3, 1.0)],
            _counts(6, 2, slow=1),
            {"memory": 1},
        )
    )
    pol.handle(P.ListenQueueSampled(2.0, 4, 128))
    snap = pol.snapshot(3.0)
    content_type, body = metrics.render(snap, openmetrics=True)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "server"))): s.value
        for f in families.values()
        for s in f.samples
    }
    assert families["fcgi_engine_requests"].type == "counter"
    assert families["fcgi_engine_request_duration_seconds"].type == "histogram"
    assert samples[("fcgi_engine_requests_total", (("class", "2xx"),))] == 7
    assert samples[("fcgi_engine_requests_total", (("class", "5xx"),))] == 2
    assert samples[("fcgi_engine_request_duration_seconds_bucket", (("le", "+Inf"),))] == 9
    assert samples[("fcgi_engine_request_duration_seconds_count", ())] == 9
    assert samples[("fcgi_engine_in_flight_requests", ())] == 1
    assert samples[("fcgi_engine_listen_queue_length", ())] == 4
    assert samples[("fcgi_engine_workers", (("state", "busy"),))] == 1
    assert samples[("fcgi_engine_worker_restarts_total", (("cause", "memory"),))] == 1
    assert samples[("fcgi_engine_generation", ())] == 1
    assert samples[("fcgi_engine_generation_start_time_seconds", ())] == 1000.0
    server_labels = {s.labels["server"] for f in families.values() for s in f.samples}
    assert server_labels == {'a "quoted" server'}
    json_type, json_body = metrics.render(snap, openmetrics=False)
    assert json_type == "application/json" and b'"requests_per_second"' in json_body


def test_openmetrics_of_an_older_snapshot_still_parses() -> None:
    text = metrics.render_openmetrics({"name": "old", "generation": 3, "workers": []})
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "fcgi_engine_generation" in names
