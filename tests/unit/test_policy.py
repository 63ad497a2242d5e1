"""The master's pure policy: every signal and every rollout outcome, in milliseconds."""

from __future__ import annotations

import signal
from typing import Any

from fcgi_engine.channel import WorkerInfo
from fcgi_engine.control import ErrorResponse, RolloutResponse, StatusResponse, StoppedResponse
from fcgi_engine.master import policy as P


def make(nproc: int = 2) -> P.MasterPolicy:
    return P.MasterPolicy(P.Settings("api", nproc, boot_timeout=10, graceful_timeout=30))


def kinds(actions: list[P.Action]) -> list[str]:
    return [type(a).__name__ for a in actions if not isinstance(a, P.Log)]


def replies(actions: list[P.Action]) -> list[P.Reply]:
    return [a for a in actions if isinstance(a, P.Reply)]


def rollout_reply(actions: list[P.Action]) -> RolloutResponse:
    [reply] = replies(actions)
    assert isinstance(reply.payload, RolloutResponse)
    return reply.payload


def status_of(pol: P.MasterPolicy, now: float) -> dict[str, Any]:
    [reply] = pol.handle(P.StatusRequested(now, "c"))
    assert isinstance(reply, P.Reply) and isinstance(reply.payload, StatusResponse)
    return reply.payload.status


def started(pol: P.MasterPolicy) -> None:
    assert kinds(pol.handle(P.Started(0.0))) == ["SpawnGeneration"]
    acts = pol.handle(P.GenerationReady(1, 1.0, [11, 12]))
    assert P.NotifyStarted(True, "generation 1 ready") in acts
    assert pol.active == 1


def test_start_spawns_and_ready_notifies() -> None:
    started(make())


def test_first_boot_failure_exits_nonzero() -> None:
    pol = make()
    pol.handle(P.Started(0.0))
    acts = pol.handle(P.GenerationFailed(1, 0.5, "ImportError: no module x"))
    assert P.KillGeneration(1) in acts
    assert P.NotifyStarted(False, "ImportError: no module x") in acts
    assert kinds(pol.handle(P.GenerationExited(1, 0.6, 1))) == ["Exit"]
    assert pol.exit_code == 1


def test_hup_rolls_out_and_drains_old_after_new_is_ready() -> None:
    pol = make()
    started(pol)
    acts = pol.handle(P.SignalReceived(signal.SIGHUP, 5.0))
    assert acts[0] == P.SpawnGeneration(2, 2)
    # The old generation is untouched until the new one is ready.
    assert not [a for a in acts if isinstance(a, P.SignalGeneration)]
    acts = pol.handle(P.GenerationReady(2, 6.0, [21, 22]))
    assert P.SignalGeneration(1, signal.SIGHUP) in acts
    assert pol.active == 2


def test_graceful_reply_waits_for_the_old_generation_to_exit() -> None:
    pol = make()
    started(pol)
    pol.handle(P.RolloutRequested(5.0, reply_to="caller"))
    acts = pol.handle(P.GenerationReady(2, 6.0, [21, 22]))
    assert not [a for a in acts if isinstance(a, P.Reply)]
    acts = pol.handle(P.GenerationExited(1, 7.0, 0))
    [reply] = replies(acts)
    assert reply.reply_to == "caller"
    assert reply.payload == RolloutResponse(
        ok=True, from_gen=1, to_gen=2, workers=2, boot_seconds=1.0, seconds=2.0
    )


def test_failed_rollout_rolls_back_and_keeps_old() -> None:
    pol = make()
    started(pol)
    pol.handle(P.RolloutRequested(5.0, reply_to="caller"))
    acts = pol.handle(P.GenerationFailed(2, 6.0, "RuntimeError: broken release"))
    assert P.KillGeneration(2) in acts
    assert rollout_reply(acts) == RolloutResponse(
        ok=False,
        from_gen=1,
        to_gen=2,
        error="RuntimeError: broken release",
        rolled_back=True,
        boot_seconds=1.0,
    )
    assert not [a for a in acts if isinstance(a, P.SignalGeneration)]
    assert pol.active == 1
    assert pol.handle(P.GenerationExited(2, 6.5, -9)) == []


def test_boot_timeout_fails_the_rollout() -> None:
    pol = make()
    started(pol)
    pol.handle(P.RolloutRequested(5.0, reply_to="c"))
    assert pol.handle(P.Tick(14.0)) == []
    acts = pol.handle(P.Tick(15.5))
    assert P.KillGeneration(2) in acts
    assert "boot_timeout" in rollout_reply(acts).error


def test_generation_exiting_before_ready_reports_its_output() -> None:
    pol = make()
    started(pol)
    pol.handle(P.RolloutRequested(5.0, reply_to="c"))
    acts = pol.handle(P.GenerationExited(2, 5.5, 1, "Segmentation fault"))
    assert rollout_reply(acts).error == "Segmentation fault"
    assert pol.active == 1


def test_second_rollout_refused_while_one_boots() -> None:
    pol = make()
    started(pol)
    pol.handle(P.RolloutRequested(5.0, reply_to="a"))
    acts = pol.handle(P.RolloutRequested(5.1, reply_to="b"))
    assert acts == [
        P.Reply("b", ErrorResponse("a rollout is already running (generation 2 is booting)"))
    ]


def test_term_drains_everything_then_exits_zero() -> None:
    pol = make()
    started(pol)
    acts = pol.handle(P.SignalReceived(signal.SIGTERM, 9.0))
    # The listener first refuses new connections, then the generation serves its queue dry.
    assert kinds(acts) == ["StopAccepting", "StopGeneration"]
    assert acts[-1] == P.StopGeneration(1)
    assert kinds(pol.handle(P.GenerationExited(1, 10.0, 0))) == ["Exit"]
    assert pol.exit_code == 0


def test_term_during_rollout_kills_the_booting_generation() -> None:
    pol = make()
    started(pol)
    pol.handle(P.RolloutRequested(5.0, reply_to="c"))
    acts = pol.handle(P.SignalReceived(signal.SIGTERM, 5.5))
    assert P.KillGeneration(2) in acts and P.StopGeneration(1) in acts
    pol.handle(P.GenerationExited(2, 5.6, -9))
    assert kinds(pol.handle(P.GenerationExited(1, 6.0, 0))) == ["Exit"]


def test_quit_and_int_are_fast_stops() -> None:
    for sig in (signal.SIGQUIT, signal.SIGINT):
        pol = make()
        started(pol)
        assert P.SignalGeneration(1, signal.SIGQUIT) in pol.handle(P.SignalReceived(sig, 3.0))


def test_ttin_ttou_resize_by_count_with_a_minimum_of_one() -> None:
    pol = make(nproc=1)
    started(pol)
    assert P.ResizeGeneration(1, 2) in pol.handle(P.SignalReceived(signal.SIGTTIN, 2.0))
    assert P.ResizeGeneration(1, 1) in pol.handle(P.SignalReceived(signal.SIGTTOU, 2.1))
    assert kinds(pol.handle(P.SignalReceived(signal.SIGTTOU, 2.2))) == []
    assert pol.nproc == 1


def test_usr1_reopens_logs_everywhere_and_usr2_reexecs_at_the_next_tick() -> None:
    pol = make()
    started(pol)
    acts = pol.handle(P.SignalReceived(signal.SIGUSR1, 2.0))
    assert P.ReopenLogs() in acts and P.SignalGeneration(1, signal.SIGUSR1) in acts
    assert P.ReExec() not in pol.handle(P.SignalReceived(signal.SIGUSR2, 2.0))
    assert P.ReExec() in pol.handle(P.Tick(2.0))
    assert P.ReExec() not in pol.handle(P.Tick(2.1))
    pol.handle(P.RolloutRequested(3.0))
    pol.handle(P.SignalReceived(signal.SIGUSR2, 3.1))
    assert P.ReExec() not in pol.handle(P.Tick(3.1))


def test_usr2_then_hup_in_one_batch_drops_the_reexec_for_the_rollout() -> None:
    pol = make()
    started(pol)
    pol.handle(P.SignalReceived(signal.SIGUSR2, 2.0))
    assert spawned(pol.handle(P.SignalReceived(signal.SIGHUP, 2.0))) == [2]
    acts = pol.handle(P.Tick(2.0))
    assert P.ReExec() not in acts
    assert any(isinstance(a, P.Log) and "re-exec dropped" in a.message for a in acts)
    # Nothing is left pending: the rollout's end does not re-exec by surprise.
    pol.handle(P.GenerationReady(2, 3.0, [21, 22]))
    assert P.ReExec() not in pol.handle(P.Tick(3.0))


def test_usr2_while_a_graceful_waits_for_its_drain_reexecs_after_the_answer() -> None:
    pol = make()
    started(pol)
    pol.handle(P.RolloutRequested(5.0, reply_to="caller"))
    pol.handle(P.GenerationReady(2, 6.0, [21, 22]))
    # The old generation drains; the caller still waits for its answer.
    pol.handle(P.SignalReceived(signal.SIGUSR2, 7.0))
    assert P.ReExec() not in pol.handle(P.Tick(7.0))
    acts = pol.handle(P.GenerationExited(1, 8.0, 0))
    assert rollout_reply(acts).ok
    assert P.ReExec() in acts + pol.handle(P.Tick(8.0))


def test_active_generation_crash_boots_a_new_one() -> None:
    pol = make()
    started(pol)
    acts = pol.handle(P.GenerationExited(1, 4.0, -9))
    assert P.SpawnGeneration(2, 2) in acts


def test_repeated_crashes_are_backed_off() -> None:
    pol = make()
    started(pol)
    pol.handle(P.GenerationExited(1, 4.0, -9))
    pol.handle(P.GenerationFailed(2, 4.5, "crash"))
    pol.handle(P.GenerationExited(2, 4.6, 1))
    assert pol.booting is None and pol.respawn_at is not None
    assert kinds(pol.handle(P.Tick(pol.respawn_at - 0.01))) == []
    assert kinds(pol.handle(P.Tick(pol.respawn_at + 0.01))) == ["SpawnGeneration"]


def test_draining_generation_killed_after_graceful_timeout_backstop() -> None:
    pol = make()
    started(pol)
    pol.handle(P.RolloutRequested(5.0))
    pol.handle(P.GenerationReady(2, 6.0, [1]))
    assert P.KillGeneration(1) not in pol.handle(P.Tick(36.0))
    assert P.KillGeneration(1) in pol.handle(P.Tick(41.5))
    # Killed once: later ticks wait for its reap.
    assert P.KillGeneration(1) not in pol.handle(P.Tick(1e9))


def test_status_snapshot_counts_workers_and_requests_and_names_the_address() -> None:
    pol = P.MasterPolicy(P.Settings("api", 2, listen="127.0.0.1:43117"))
    started(pol)
    workers = [WorkerInfo(11, "idle", 5, 1.5), WorkerInfo(12, "busy", 7, 1.5)]
    pol.handle(P.GenerationStatus(1, 2.0, workers))
    status = status_of(pol, 3.0)
    assert status["generation"] == 1 and status["requests"] == 12
    assert status["workers_ready"] == 2 and status["state"] == "running"
    assert status["listen"] == "127.0.0.1:43117"
    # The JSON `status --json` shows: workers as objects, as the generation reported them.
    assert status["workers"] == [
        {
            "pid": 11,
            "state": "idle",
            "requests": 5,
            "started": 1.5,
            "started_at": None,
            "request": None,
        },
        {
            "pid": 12,
            "state": "busy",
            "requests": 7,
            "started": 1.5,
            "started_at": None,
            "request": None,
        },
    ]


def test_usr1_skips_a_booting_generation_and_resize_catches_up_after_boot() -> None:
    pol = make(nproc=2)
    started(pol)
    pol.handle(P.RolloutRequested(5.0))
    acts = pol.handle(P.SignalReceived(signal.SIGUSR1, 5.1))
    assert P.SignalGeneration(2, signal.SIGUSR1) not in acts
    assert P.SignalGeneration(1, signal.SIGUSR1) in acts
    pol.handle(P.SignalReceived(signal.SIGTTIN, 5.2))
    acts = pol.handle(P.GenerationReady(2, 6.0, [21, 22]))
    assert P.ResizeGeneration(2, 3) in acts


# ---------------------------------------------------------------- HUP during a boot is queued


def spawned(actions: list[P.Action]) -> list[int]:
    return [a.gen_id for a in actions if isinstance(a, P.SpawnGeneration)]


def test_hup_during_boot_queues_one_more_rollout_after_ready() -> None:
    pol = make()
    started(pol)
    assert spawned(pol.handle(P.SignalReceived(signal.SIGHUP, 5.0))) == [2]
    acts = pol.handle(P.SignalReceived(signal.SIGHUP, 5.1))
    assert spawned(acts) == []
    assert any(isinstance(a, P.Log) and "queued" in a.message for a in acts)
    assert status_of(pol, 5.2)["rollout_queued"] is True
    acts = pol.handle(P.GenerationReady(2, 6.0, [21, 22]))
    # Generation 2 takes over as usual, and the queued rollout starts at once.
    assert P.SignalGeneration(1, signal.SIGHUP) in acts
    assert spawned(acts) == [3]
    assert pol.active == 2 and pol.booting == 3
    assert pol.snapshot(6.0)["rollout_queued"] is False


def test_hup_during_the_first_boot_queues_a_rollout_after_it() -> None:
    pol = make()
    assert spawned(pol.handle(P.Started(0.0))) == [1]
    assert spawned(pol.handle(P.SignalReceived(signal.SIGHUP, 0.1))) == []
    acts = pol.handle(P.GenerationReady(1, 1.0, [11, 12]))
    assert P.NotifyStarted(True, "generation 1 ready") in acts
    assert spawned(acts) == [2]


def test_many_hups_during_one_boot_queue_a_single_rollout() -> None:
    pol = make()
    started(pol)
    pol.handle(P.SignalReceived(signal.SIGHUP, 5.0))
    for n in range(3):
        assert spawned(pol.handle(P.SignalReceived(signal.SIGHUP, 5.1 + n / 10))) == []
    assert spawned(pol.handle(P.GenerationReady(2, 6.0, [21, 22]))) == [3]
    # The queued rollout was the only extra one: its own ready starts nothing more.
    assert spawned(pol.handle(P.GenerationReady(3, 7.0, [31, 32]))) == []
    assert pol.active == 3 and pol.booting is None


def test_queued_hup_still_rolls_out_after_a_failed_boot() -> None:
    pol = make()
    started(pol)
    pol.handle(P.SignalReceived(signal.SIGHUP, 5.0))
    pol.handle(P.SignalReceived(signal.SIGHUP, 5.1))
    acts = pol.handle(P.GenerationFailed(2, 6.0, "RuntimeError: broken release"))
    assert P.KillGeneration(2) in acts
    # Perhaps the HUP came with the fix for the broken release: it is honoured.
    assert spawned(acts) == [3]
    assert pol.active == 1 and pol.booting == 3


def test_queued_hup_still_rolls_out_after_an_exit_or_timeout_before_ready() -> None:
    pol = make()
    started(pol)
    pol.handle(P.SignalReceived(signal.SIGHUP, 5.0))
    pol.handle(P.SignalReceived(signal.SIGHUP, 5.1))
    assert spawned(pol.handle(P.GenerationExited(2, 5.5, 1, "Segmentation fault"))) == [3]
    pol.handle(P.SignalReceived(signal.SIGHUP, 5.6))
    # Generation 3 hangs past boot_timeout (10 s): the queued rollout follows its failure.
    acts = pol.handle(P.Tick(16.0))
    assert P.KillGeneration(3) in acts
    assert spawned(acts) == [4]


def test_queued_hup_is_dropped_when_the_server_stops() -> None:
    pol = make()
    started(pol)
    pol.handle(P.SignalReceived(signal.SIGHUP, 5.0))
    pol.handle(P.SignalReceived(signal.SIGHUP, 5.1))
    acts = pol.handle(P.SignalReceived(signal.SIGTERM, 5.2))
    assert P.KillGeneration(2) in acts and spawned(acts) == []
    assert pol.snapshot(5.2)["rollout_queued"] is False
    assert spawned(pol.handle(P.GenerationExited(2, 5.3, -9))) == []
    acts = pol.handle(P.GenerationExited(1, 6.0, 0))
    assert spawned(acts) == [] and P.Exit(0) in acts


def test_queued_hup_does_not_keep_a_failed_first_boot_alive() -> None:
    # A failed first boot ends `serve` non-zero (its --daemon parent is already told so).
    pol = make()
    pol.handle(P.Started(0.0))
    pol.handle(P.SignalReceived(signal.SIGHUP, 0.1))
    acts = pol.handle(P.GenerationFailed(1, 0.5, "ImportError: no module x"))
    assert spawned(acts) == []
    assert P.NotifyStarted(False, "ImportError: no module x") in acts
    assert kinds(pol.handle(P.GenerationExited(1, 0.6, 1))) == ["Exit"]


def test_graceful_during_boot_is_refused_not_queued() -> None:
    pol = make()
    started(pol)
    pol.handle(P.SignalReceived(signal.SIGHUP, 5.0))
    acts = pol.handle(P.RolloutRequested(5.1, reply_to="b"))
    assert acts == [
        P.Reply("b", ErrorResponse("a rollout is already running (generation 2 is booting)"))
    ]
    assert spawned(pol.handle(P.GenerationReady(2, 6.0, [21, 22]))) == []


def test_active_generation_exit_during_a_rollout_keeps_the_booting_one() -> None:
    pol = make()
    started(pol)
    pol.handle(P.RolloutRequested(5.0, reply_to="c"))
    acts = pol.handle(P.GenerationExited(1, 5.5, -9))
    assert spawned(acts) == []
    assert pol.booting == 2
    acts = pol.handle(P.GenerationReady(2, 6.0, [21, 22]))
    assert pol.active == 2
    reply = rollout_reply(acts)
    assert reply.ok is True and reply.to_gen == 2


def test_queued_hup_after_a_failed_boot_with_nothing_serving_is_the_backed_off_respawn() -> None:
    pol = make()
    started(pol)
    assert spawned(pol.handle(P.GenerationExited(1, 4.0, -9))) == [2]
    pol.handle(P.SignalReceived(signal.SIGHUP, 4.1))
    # No generation serves: the respawn boots the deployed code after its back-off, which is
    # what the HUP asked for; an immediate extra boot would defeat the back-off.
    assert spawned(pol.handle(P.GenerationFailed(2, 4.5, "crash"))) == []
    pol.handle(P.GenerationExited(2, 4.6, 1))
    assert pol.respawn_at is not None
    assert spawned(pol.handle(P.Tick(pol.respawn_at + 0.01))) == [3]
    assert spawned(pol.handle(P.GenerationReady(3, 8.0, [31, 32]))) == []
    assert pol.active == 3 and not pol.rollout_queued


# ---------------------------------------------------------------- stop replies, last rollout


def test_stop_request_is_answered_once_everything_has_exited() -> None:
    pol = make()
    started(pol)
    acts = pol.handle(P.StopRequested(3.0, fast=False, reply_to="mgr"))
    assert replies(acts) == []
    acts = pol.handle(P.GenerationExited(1, 4.0, 0))
    assert P.Reply("mgr", StoppedResponse()) in acts and P.Exit(0) in acts


def test_stop_during_stop_is_answered_too() -> None:
    pol = make()
    started(pol)
    pol.handle(P.StopRequested(3.0, reply_to="a"))
    pol.handle(P.StopRequested(3.5, fast=True, reply_to="b"))
    acts = pol.handle(P.GenerationExited(1, 4.0, 0))
    assert [r.reply_to for r in replies(acts)] == ["a", "b"]


def test_rollout_during_stop_is_refused() -> None:
    pol = make()
    started(pol)
    pol.handle(P.SignalReceived(signal.SIGTERM, 3.0))
    assert pol.handle(P.RolloutRequested(3.1, reply_to="c")) == [
        P.Reply("c", ErrorResponse("the server is stopping"))
    ]


def test_last_rollout_in_the_status_has_its_wire_shape() -> None:
    pol = make()
    started(pol)
    pol.handle(P.SignalReceived(signal.SIGHUP, 5.0))
    pol.handle(P.GenerationReady(2, 6.5, [21, 22]))
    assert status_of(pol, 7.0)["last_rollout"] == {
        "ok": True,
        "from": 1,
        "to": 2,
        "workers": 2,
        "boot_seconds": 1.5,
    }
    pol.handle(P.SignalReceived(signal.SIGHUP, 8.0))
    pol.handle(P.GenerationFailed(3, 8.5, "boom"))
    assert status_of(pol, 9.0)["last_rollout"] == {
        "ok": False,
        "from": 2,
        "to": 3,
        "error": "boom",
        "rolled_back": True,
        "boot_seconds": 0.5,
    }


# ---------------------------------------------------------------- adoption after a re-exec


def adopted(pol: P.MasterPolicy, *gens: P.AdoptedGeneration, active: int | None) -> list[P.Action]:
    return pol.handle(P.Adopted(100.0, list(gens), active=active, next_id=5, nproc=3))


def test_adoption_takes_over_the_active_and_draining_generations() -> None:
    pol = make()
    workers = [WorkerInfo(41, "idle", 9, 50.0)]
    acts = adopted(
        pol,
        P.AdoptedGeneration(3, P.Phase.DRAINING, [31], []),
        P.AdoptedGeneration(4, P.Phase.ACTIVE, [41], workers),
        active=4,
    )
    assert spawned(acts) == [] and not [a for a in acts if isinstance(a, P.NotifyStarted)]
    assert pol.active == 4 and pol.nproc == 3 and pol.next_id == 5
    status = status_of(pol, 101.0)
    assert status["state"] == "running" and status["requests"] == 9
    assert [g["id"] for g in status["generations"]] == [3, 4]
    # The draining one is still bounded by graceful_timeout (30 s) and the backstop.
    assert P.KillGeneration(3) not in pol.handle(P.Tick(134.0))
    assert P.KillGeneration(3) in pol.handle(P.Tick(136.0))
    # Generation ids go on from where the old image left them.
    assert spawned(pol.handle(P.SignalReceived(signal.SIGHUP, 140.0))) == [5]


def test_adoption_without_an_active_generation_boots_one() -> None:
    pol = make()
    acts = adopted(pol, P.AdoptedGeneration(3, P.Phase.DRAINING, [31], []), active=None)
    assert acts[0] == P.SpawnGeneration(5, 3)
    assert pol.active is None and pol.booting == 5


def test_adoption_ignores_an_active_id_it_was_not_given() -> None:
    pol = make()
    acts = adopted(pol, active=7)
    assert spawned(acts) == [5] and pol.active is None


def test_adopted_master_stops_once_the_adopted_generations_exit() -> None:
    pol = make()
    adopted(pol, P.AdoptedGeneration(4, P.Phase.ACTIVE, [41], []), active=4)
    assert P.StopGeneration(4) in pol.handle(P.SignalReceived(signal.SIGTERM, 101))
    assert P.Exit(0) in pol.handle(P.GenerationExited(4, 102.0, 0))


def test_reexec_state_round_trips_and_reads_what_an_older_master_wrote() -> None:
    from fcgi_engine.master.loop import InheritedGeneration, ReexecState

    state = ReexecState(
        listen=3,
        handoff=(4, 5),
        control=6,
        active=2,
        next_id=3,
        generations=[
            InheritedGeneration(2, 100, 7, 8, "active", [101], [WorkerInfo(101, "idle", 4, 9.5)])
        ],
        nproc=2,
        unix_path="/run/app.sock",
    )
    assert ReexecState.from_json(state.to_json()) == state
    # An engine from before typed messages wrote no nproc nor unix_path.
    old = (
        '{"listen": 3, "handoff": [4, 5], "control": -1, "active": null, "next_id": 9, '
        '"generations": [{"id": 8, "pid": 80, "channel": 7, "output": 8, "phase": "draining", '
        '"pids": [81], "workers": [{"pid": 81, "state": "busy", "requests": 1, "started": 2}]}]}'
    )
    parsed = ReexecState.from_json(old)
    assert parsed.nproc is None and parsed.unix_path is None and parsed.control == -1
    assert parsed.generations[0].workers == [WorkerInfo(81, "busy", 1, 2.0)]


# ---------------------------------------------------------------- leaving, readiness (issue 12)


def make_delayed(drain_delay: float) -> P.MasterPolicy:
    return P.MasterPolicy(
        P.Settings("api", 2, boot_timeout=10, graceful_timeout=30, drain_delay=drain_delay)
    )


def test_ready_only_once_a_generation_is_proven() -> None:
    pol = make()
    pol.handle(P.Started(0.0))
    assert not pol.ready()
    assert pol.not_ready_reason() == "generation 1 is booting"
    assert status_of(pol, 0.5)["ready"] is False
    pol.handle(P.GenerationReady(1, 1.0, [11, 12]))
    assert pol.ready() and status_of(pol, 1.5)["ready"] is True
    assert status_of(pol, 1.5)["not_ready_reason"] is None


def test_ready_throughout_a_graceful_rollout() -> None:
    pol = make()
    started(pol)
    pol.handle(P.RolloutRequested(5.0, reply_to="c"))
    assert pol.ready()  # generation 1 serves while 2 boots
    pol.handle(P.GenerationReady(2, 6.0, [21, 22]))
    assert pol.ready()  # 2 serves while 1 drains
    pol.handle(P.GenerationExited(1, 7.0, 0))
    assert pol.ready()


def test_a_failed_rollout_keeps_ready() -> None:
    pol = make()
    started(pol)
    pol.handle(P.RolloutRequested(5.0, reply_to="c"))
    pol.handle(P.GenerationFailed(2, 6.0, "boom"))
    assert pol.ready()


def test_not_ready_when_the_only_generation_died() -> None:
    pol = make()
    started(pol)
    pol.handle(P.GenerationExited(1, 5.0, -9))
    assert pol.not_ready_reason() == "generation 2 is booting"


def test_term_with_drain_delay_serves_on_not_ready_then_leaves() -> None:
    pol = make_delayed(2.0)
    started(pol)
    acts = pol.handle(P.SignalReceived(signal.SIGTERM, 10.0))
    # Nothing stops yet: the generation serves on while the load balancer learns.
    assert kinds(acts) == []
    assert not pol.ready()
    assert pol.not_ready_reason() == "stopping: drain_delay runs, then it stops accepting"
    snap = status_of(pol, 10.5)
    assert snap["drain_delay_until"] == 12.0 and snap["stopping_at"] == 10.0
    assert snap["state"] == "stopping" and snap["ready"] is False
    assert kinds(pol.handle(P.Tick(11.9))) == []
    assert pol.generations[1].phase is P.Phase.ACTIVE
    acts = pol.handle(P.Tick(12.0))
    assert kinds(acts) == ["StopAccepting", "StopGeneration"]
    assert pol.generations[1].phase is P.Phase.DRAINING
    assert pol.generations[1].deadline == 42.0  # graceful_timeout runs from now
    assert status_of(pol, 12.1)["drain_delay_until"] is None
    assert kinds(pol.handle(P.Tick(13.0))) == []  # once
    assert kinds(pol.handle(P.GenerationExited(1, 14.0, 0))) == ["Exit"]


def test_stop_request_during_drain_delay_is_answered_when_stopped() -> None:
    pol = make_delayed(5.0)
    started(pol)
    pol.handle(P.StopRequested(10.0, reply_to="first"))
    assert kinds(pol.handle(P.StopRequested(11.0, reply_to="second"))) == []
    pol.handle(P.Tick(15.0))
    acts = pol.handle(P.GenerationExited(1, 16.0, 0))
    assert [r.reply_to for r in replies(acts)] == ["first", "second"]
    assert kinds(acts)[-1] == "Exit"


def test_fast_stop_cuts_a_drain_delay_short() -> None:
    pol = make_delayed(5.0)
    started(pol)
    pol.handle(P.SignalReceived(signal.SIGTERM, 10.0))
    acts = pol.handle(P.SignalReceived(signal.SIGQUIT, 11.0))
    assert kinds(acts) == ["StopAccepting", "SignalGeneration"]
    assert P.SignalGeneration(1, signal.SIGQUIT) in acts
    assert kinds(pol.handle(P.Tick(15.0))) == []  # the delay is over for good


def test_rollout_refused_during_drain_delay() -> None:
    pol = make_delayed(5.0)
    started(pol)
    pol.handle(P.SignalReceived(signal.SIGTERM, 10.0))
    [reply] = replies(pol.handle(P.RolloutRequested(11.0, reply_to="c")))
    assert reply.payload == ErrorResponse("the server is stopping")


def test_drain_delay_skipped_when_nothing_serves() -> None:
    pol = make_delayed(5.0)
    pol.handle(P.Started(0.0))
    acts = pol.handle(P.SignalReceived(signal.SIGTERM, 0.5))
    # The booting generation is killed; there is nothing to serve on with.
    assert P.KillGeneration(1) in acts and "StopAccepting" in kinds(acts)
    assert kinds(pol.handle(P.GenerationExited(1, 0.6, -9))) == ["Exit"]


def test_term_during_rollout_with_drain_delay_old_generation_serves_on() -> None:
    pol = make_delayed(3.0)
    started(pol)
    pol.handle(P.RolloutRequested(5.0, reply_to="c"))
    acts = pol.handle(P.SignalReceived(signal.SIGTERM, 5.5))
    assert P.KillGeneration(2) in acts
    assert rollout_reply(acts).ok is False
    assert pol.generations[1].phase is P.Phase.ACTIVE
    assert kinds(pol.handle(P.Tick(8.5))) == ["StopAccepting", "StopGeneration"]


def test_rollout_outcome_carries_release_dir_and_health() -> None:
    pol = make()
    started(pol)
    pol.handle(P.RolloutRequested(5.0, reply_to="c"))
    pol.handle(P.GenerationSpawned(2, 5.0, "/srv/app/releases/8"))
    health = {"path": "/healthz", "status": 200}
    pol.handle(P.GenerationReady(2, 6.25, [21, 22], health=health))
    acts = pol.handle(P.GenerationExited(1, 7.0, 0))
    outcome = rollout_reply(acts)
    assert outcome.ok and outcome.release_dir == "/srv/app/releases/8"
    assert outcome.health == health and outcome.boot_seconds == 1.25


def test_failed_rollout_outcome_carries_the_failed_health_check() -> None:
    pol = make()
    started(pol)
    pol.handle(P.RolloutRequested(5.0, reply_to="c"))
    pol.handle(P.GenerationSpawned(2, 5.0, "/srv/app/releases/9"))
    health = {"path": "/healthz", "status": 500}
    acts = pol.handle(P.GenerationFailed(2, 5.5, "health check answered 500", health))
    outcome = rollout_reply(acts)
    assert not outcome.ok and outcome.rolled_back
    assert outcome.release_dir == "/srv/app/releases/9" and outcome.health == health
    assert outcome.boot_seconds == 0.5


def test_a_reexec_keeps_the_uptime_and_the_generations_age() -> None:
    """Found by a trial: after USR2 the status page said the master and its generation had
    just started. Both come from the wall clock the previous image knew."""
    pol = make()
    started_wall = 1_700_000_000.0
    pol.handle(
        P.Adopted(
            100.0,
            [P.AdoptedGeneration(2, P.Phase.ACTIVE, [41], [], started_at=started_wall + 60.0)],
            active=2,
            next_id=3,
            nproc=2,
            wall=started_wall + 600.0,
            metrics={"started_wall": started_wall},
        )
    )
    snap = pol.snapshot(110.0)
    assert snap["uptime"] == 610.0
    assert snap["started_at"] == started_wall
    [gen] = snap["generations"]
    assert gen["age"] == 550.0 and gen["started_at"] == started_wall + 60.0
