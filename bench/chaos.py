"""A bounded chaos run: faults injected at random into fcgi-engine under keep-alive load.

    python3 bench/chaos.py --duration 600 --seed 1 --out chaos.json

Options: --duration SECONDS (600), --seed N (1), --clients N (8), --keep-conn on|off (on),
--out FILE (the report as JSON), --engine CMD (default: `fcgi-engine` on PATH, else
`python3 -m fcgi_engine`), --keep-dir (keep the temp dir: config, releases, logs),
--faults KIND,... and --broken KIND,... (a subset of the faults, for a focused run).

What it does: starts `fcgi-engine -c CFG start` from a generated YAML (one server: `app:` a
module in `chdir: SITE/current`, `current -> releases/N`, `health: /healthz`, nproc 2,
boot_timeout 10, graceful_timeout 10, timeout 20, unix socket and pidfile in a temp dir), a
real nginx in front of it (bench/common.py's config: fastcgi_keep_conn on with an upstream
keepalive pool, or off), and N closed-loop keep-alive HTTP/1.1 clients (half GETs, half small
POSTs; every answer is checked for status, release and echoed body length). Every 1-3 s
(seeded) it injects one fault: SIGKILL a worker; SIGKILL the active generation process; SIGSTOP
a worker, SIGCONT 2-5 s later (never the last running one); a good rollout (new release, switch
the symlink, `graceful`); a broken rollout, then the symlink switched back: import error, health
500, slow health (1.5 s) then 500, import that hangs past boot_timeout, or boot_hang (the same
hang, but not in `check`'s throw-away import, recognised by --check in argv, so that the
master's boot_timeout must catch it); TTIN/TTOU (1..4 workers); USR2 (re-exec); 4 slow peers
trickling FastCGI params at 1 byte / 0.5 s for ~20 s; or 50 malformed connections. Rollouts run
in a background thread, one at a time, so the other faults keep coming during them; the active
generation is not killed while `current` points at a broken release (its replacement would boot
that release: the harness's doing, not a bug).

A thread samples `fcgi-engine -c CFG status --json` every 0.5 s: a sample is worker-less when
no generation is active, the active one lists no workers, or none of its listed worker pids is
alive and running (state R, S or D; T = stopped does not count). A sample where `status`
says the master is dead while its pid lives is listed as a misreport, not as worker-less; one
whose listed workers are all gone is asked again at once (the snapshot may predate a hand-over)
and counts only if the second answer is worker-less too.
After the fault window the run waits (bounded) for a running rollout, slow peers and pending
SIGCONTs, keeps the load 2 s more, then measures and stops everything (`stop`, then SIGKILL by
pid whatever of ours is left; nginx).

Exit status: 0 clean; 1 when a request failed other than in flight on a killed process
(a failure within 1 s after a SIGKILL of a worker or generation), or any worker-less sample;
2 when the run could not be set up. Loopback and unix sockets only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NGINX  # noqa: E402

SAMPLE_INTERVAL = 0.5
IN_FLIGHT_WINDOW = 1.0
BOOT_TIMEOUT = 10
GRACEFUL_TIMEOUT = 10
STUCK_TIMEOUT = 20
REQUEST_TIMEOUT = 30.0
BROKEN_KINDS = ("import_error", "health_500", "health_slow", "import_hang", "boot_hang")
FAULT_KINDS = (
    "kill_worker",
    "kill_generation",
    "stop_worker",
    "good_rollout",
    "broken_rollout",
    "ttin_ttou",
    "usr2",
    "slow_peers",
    "malformed",
)
SERVING_STATES = {"R", "S", "D"}  # running, sleeping, disk wait; not T/t (stopped), Z, X

APP = '''"""chaos release {version} ({kind})"""
import os
import sys
import time

VERSION = {version!r}
KIND = {kind!r}

if KIND == "import_error":
    raise ImportError("chaos: release {version} is broken on purpose (import error)")
if KIND == "import_hang" or (KIND == "boot_hang" and "--check" not in sys.argv):
    time.sleep({hang})


def _answer(start_response, status, text):
    data = text.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


def application(environ, start_response):
    if environ.get("PATH_INFO", "").endswith("/healthz"):
        if KIND == "health_500":
            return _answer(start_response, "500 Internal Server Error", "unhealthy\\n")
        if KIND == "health_slow":
            time.sleep(1.5)
            return _answer(start_response, "500 Internal Server Error", "slow and unhealthy\\n")
        return _answer(start_response, "200 OK", "ok\\n")
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    return _answer(start_response, "200 OK", "%s %d %d" % (VERSION, len(body), os.getpid()))
'''


# ---------------------------------------------------------------- /proc helpers


@dataclass(frozen=True)
class Stat:
    state: str
    ppid: int
    start: int  # clock ticks since boot: with the pid, a process's identity


def proc_stat(pid: int) -> Stat | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2 :].split()
    return Stat(rest[0], int(rest[1]), int(rest[19]))


def children_of(pid: int) -> list[int]:
    kids: set[int] = set()
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids.update(int(x) for x in f.read().split())
        return sorted(kids)
    except (OSError, ValueError):
        pass  # no CONFIG_PROC_CHILDREN: scan every process's parent
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st and st.ppid == pid:
                kids.add(int(entry))
    return sorted(kids)


def master_rss_fds(pid: int) -> tuple[int | None, int | None]:
    rss = fds = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        pass
    return rss, fds


def descends_from(pid: int, ancestor: int, depth: int = 3) -> bool:
    for _ in range(depth):
        st = proc_stat(pid)
        if st is None:
            return False
        if st.ppid == ancestor:
            return True
        pid = st.ppid
    return False


def signal_if_same(pid: int, start: int, sig: int) -> bool:
    """Signal pid only if it is still the process we saw (same start time)."""
    st = proc_stat(pid)
    if st is None or st.start != start or st.state in ("Z", "X"):
        return False  # gone, replaced, or a zombie waiting for its parent
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def tagged_pids(tag: str) -> list[int]:
    needle = f"FCGI_CHAOS_TAG={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
    return found


# ---------------------------------------------------------------- FastCGI bytes


def fcgi_record(rtype: int, content: bytes, req_id: int = 1, version: int = 1) -> bytes:
    return struct.pack(">BBHHBx", version, rtype, req_id, len(content), 0) + content


def fcgi_pair(name: bytes, value: bytes) -> bytes:
    def size(n: int) -> bytes:
        return bytes([n]) if n < 128 else struct.pack(">I", n | 0x80000000)

    return size(len(name)) + size(len(value)) + name + value


def slow_request() -> bytes:
    params = b"".join(
        fcgi_pair(k, v)
        for k, v in (
            (b"REQUEST_METHOD", b"GET"),
            (b"SCRIPT_NAME", b""),
            (b"PATH_INFO", b"/slow"),
            (b"QUERY_STRING", b""),
            (b"SERVER_NAME", b"localhost"),
            (b"SERVER_PORT", b"80"),
            (b"SERVER_PROTOCOL", b"HTTP/1.1"),
            (b"REMOTE_ADDR", b"127.0.0.1"),
        )
    )
    return (
        fcgi_record(1, struct.pack(">HB5x", 1, 0))  # BEGIN_REQUEST, RESPONDER, no keep-conn
        + fcgi_record(4, params)
        + fcgi_record(4, b"")
        + fcgi_record(5, b"")
    )


# ---------------------------------------------------------------- the engine, through its CLI


class Engine:
    def __init__(self, cmd: list[str], config: Path, tag: str) -> None:
        self.cmd, self.config = cmd, config
        self.env = dict(os.environ, FCGI_CHAOS_TAG=tag)

    def run(self, *args: str, timeout: float = 60.0) -> tuple[int, str, str]:
        try:
            p = subprocess.run(
                [*self.cmd, "-c", str(self.config), *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.env,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            return -1, out, f"timed out after {timeout:g} s"
        except OSError as exc:
            return -1, "", f"cannot run {self.cmd[0]}: {exc}"
        return p.returncode, p.stdout, p.stderr

    def status(self, timeout: float = 5.0) -> tuple[int, dict[str, Any] | None]:
        rc, out, _err = self.run("status", "--json", timeout=timeout)
        try:
            return rc, json.loads(out)[0]
        except (ValueError, IndexError, KeyError, TypeError):
            return rc, None


# ---------------------------------------------------------------- the site (releases)


class Site:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.n = 0
        self.good = ""  # the release `current` should point at when no rollout runs
        self.broken_live = False  # `current` points at a broken release right now

    def release(self, kind: str) -> tuple[str, Path]:
        self.n += 1
        version = f"good-{self.n}" if kind == "good" else f"bad-{self.n}-{kind}"
        rel = self.root / "releases" / str(self.n)
        rel.mkdir(parents=True)
        (rel / "chaosapp.py").write_text(
            APP.format(version=version, kind=kind, hang=BOOT_TIMEOUT + 5)
        )
        return version, rel

    def switch(self, rel: Path) -> None:
        tmp = self.root / "current.new"
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(rel)
        os.replace(tmp, self.root / "current")


# ---------------------------------------------------------------- load


@dataclass
class Failure:
    t: float
    status: str
    client: int
    method: str
    detail: str
    in_flight: bool = False
    after: str = ""


class Load:
    """N closed-loop keep-alive clients; bounded by an event, a hard deadline and a count."""

    def __init__(self, port: int, path: str, clients: int, t0: float, hard_stop: float) -> None:
        self.port, self.path, self.t0, self.hard_stop = port, path, t0, hard_stop
        self.stop = threading.Event()
        self.ok: list[list[float]] = [[] for _ in range(clients)]
        self.versions: list[dict[str, list[float]]] = [{} for _ in range(clients)]
        self.failures: list[Failure] = []
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self.client, args=(i,), daemon=True, name=f"load-{i}")
            for i in range(clients)
        ]

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)

    def client(self, i: int) -> None:
        rng = random.Random(1000 + i)
        conn = self._connect()
        ok, versions = self.ok[i], self.versions[i]
        n = 0
        while not self.stop.is_set() and time.monotonic() < self.hard_stop and n < 5_000_000:
            n += 1
            body = b"x" * rng.randint(1, 2048) if n % 2 else None
            method = "POST" if body else "GET"
            status, detail = "", ""
            try:
                conn.request(method, f"{self.path}/chaos?n={n}", body=body)
                r = conn.getresponse()
                text = r.read().decode(errors="replace")
                status = str(r.status)
                parts = text.split()
                if not 200 <= r.status < 300:
                    detail = " ".join(parts)[:120]
                elif len(parts) != 3 or parts[1] != str(len(body or b"")):
                    detail = f"bad answer {text[:80]!r}"
                elif not parts[0].startswith("good-"):
                    detail = f"answered by a broken release: {text[:80]!r}"
            except Exception as exc:  # noqa: BLE001 - every failure counts
                status, detail = "error", repr(exc)[:160]
                conn.close()
                conn = self._connect()
            now = time.monotonic() - self.t0
            if detail:
                with self.lock:
                    self.failures.append(Failure(now, status, i, method, detail))
                if status == "error":
                    self.stop.wait(0.05)  # no hot loop while nginx refuses
            else:
                ok.append(now)
                seen = versions.get(parts[0])
                if seen is None:
                    versions[parts[0]] = [now, 1]
                else:
                    seen[1] += 1
        conn.close()


# ---------------------------------------------------------------- sampler


@dataclass
class Samples:
    total: int = 0
    worker_less: list[tuple[float, str]] = field(default_factory=list)
    unanswered: list[tuple[float, str]] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    master_pids: set[int] = field(default_factory=set)
    stale_snapshots: int = 0  # listed workers all gone, but the next status call was fine


class Sampler(threading.Thread):
    def __init__(self, chaos: Chaos) -> None:
        super().__init__(daemon=True, name="sampler")
        self.chaos = chaos
        self.stop = threading.Event()
        self.samples = Samples()

    def run(self) -> None:
        c = self.chaos
        due = time.monotonic()
        while not self.stop.is_set() and time.monotonic() < c.hard_stop:
            rc, st = c.engine.status()
            t = time.monotonic() - c.t0  # when the answer came: the state it describes
            self.samples.total += 1
            pid = c.master_pid()
            verdict = judge(rc, st, pid)
            if verdict and verdict.startswith("recheck"):
                # Every listed worker is gone by the time we look: the snapshot may predate a
                # hand-over by a few ms. Ask again; worker-less only if it says so again.
                rc, st = c.engine.status()
                again = judge(rc, st, pid)
                if again is None:
                    self.samples.stale_snapshots += 1
                    verdict = None
                elif again.startswith("recheck"):
                    verdict = again.replace("recheck: ", "", 1) + " (twice in a row)"
                else:
                    verdict = again
            if verdict is None:
                pass
            elif verdict.startswith(("unanswered", "misreport")):
                # Not counted as worker-less: the master lives; status could not tell.
                self.samples.unanswered.append((round(t, 2), verdict))
            else:
                self.samples.worker_less.append((round(t, 2), verdict))
            if pid:
                self.samples.master_pids.add(pid)
                rss, fds = master_rss_fds(pid)
                if rss is not None:
                    self.samples.rss.append(rss)
                if fds is not None:
                    self.samples.fds.append(fds)
                c.remember_tree(pid, st)
            due += SAMPLE_INTERVAL
            now = time.monotonic()
            if due < now:
                due = now  # a slow status call: skip the missed ticks, don't burst
            self.stop.wait(max(0.0, due - now))


def judge(rc: int, st: dict[str, Any] | None, master: int | None) -> str | None:
    """None if the active generation has a serving worker; else why not."""
    if st is None:
        return f"unanswered (status exit {rc}, no JSON)"
    state = st.get("state")
    if state == "unknown":
        return f"unanswered ({st.get('message', '')[:80]})"
    if state in ("stopped", "dead"):
        ms = proc_stat(master) if master else None
        if ms is not None and ms.state not in ("Z", "X"):
            return f"misreport: status exit {rc} says {st.get('message', '')[:70]!r}, pid lives"
        return f"no master ({st.get('message', '')[:80]})"
    if not st.get("generation"):
        return f"no active generation (state {state})"
    workers = st.get("workers") or []
    if not workers:
        return f"generation {st.get('generation')} lists no workers"
    states = []
    for w in workers:
        s = proc_stat(int(w.get("pid", 0)))
        states.append(s.state if s else "gone")
    if not any(s in SERVING_STATES for s in states):
        why = f"generation {st.get('generation')}: no worker running ({', '.join(states)})"
        return f"recheck: {why}" if all(s == "gone" for s in states) else why
    return None


# ---------------------------------------------------------------- the run


class Chaos:
    def __init__(self, args: argparse.Namespace, d: Path, engine: Engine, site: Site) -> None:
        self.args, self.d, self.engine, self.site = args, d, engine, site
        self.rng = random.Random(args.seed)
        self.t0 = time.monotonic()
        self.hard_stop = self.t0 + args.duration + 300
        self.pidfile = d / "app.pid"
        self.sock = d / "app.sock"
        self.faults: list[dict[str, Any]] = []
        self.kills: list[float] = []
        self.lock = threading.Lock()
        self.stopped: list[tuple[float, int, int]] = []  # (SIGCONT due, pid, start)
        self.seen: dict[int, int] = {}  # every engine pid seen -> start time, for cleanup
        self.rollout: threading.Thread | None = None
        self.rollouts: list[dict[str, Any]] = []
        self.slow_threads: list[threading.Thread] = []
        self.slow_stop = threading.Event()
        self.malformed_thread: threading.Thread | None = None
        self.helpers: list[threading.Thread] = []
        self.last_good_version = ""
        self.kinds = tuple(args.faults.split(",")) if args.faults else FAULT_KINDS
        self.broken_kinds = tuple(args.broken.split(",")) if args.broken else BROKEN_KINDS

    def now(self) -> float:
        return time.monotonic() - self.t0

    def master_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def remember_tree(self, master: int, st: dict[str, Any] | None) -> None:
        pids = {master, *children_of(master)}
        for g in (st or {}).get("generations", []):
            pids.update(int(w.get("pid", 0)) for w in g.get("workers", []))
        for pid in pids:
            s = proc_stat(pid)
            if s and pid not in self.seen:
                with self.lock:
                    self.seen[pid] = s.start

    def record(self, kind: str, detail: str, outcome: str = "", **extra: Any) -> dict[str, Any]:
        entry = {"t": round(self.now(), 3), "kind": kind, "detail": detail, "outcome": outcome}
        entry.update(extra)
        with self.lock:
            self.faults.append(entry)
        print(f"  {entry['t']:7.2f} s  {kind:15s} {detail} {outcome}".rstrip(), flush=True)
        return entry

    # ------------------------------------------------------------ targets

    def active_workers(self) -> tuple[int | None, list[tuple[int, Stat]]]:
        master = self.master_pid()
        if not master:
            return None, []
        _rc, st = self.engine.status()
        if not st:
            return master, []
        self.remember_tree(master, st)
        found = []
        for w in st.get("workers") or []:
            pid = int(w.get("pid", 0))
            s = proc_stat(pid)
            if s and s.state in SERVING_STATES and descends_from(pid, master, 2):
                found.append((pid, s))
        return master, found

    # ------------------------------------------------------------ faults

    def rollout_running(self) -> bool:
        return bool(self.rollout and self.rollout.is_alive())

    def choose(self) -> str | None:
        for _ in range(100):
            kind = self.rng.choice(self.kinds)
            if kind.endswith("_rollout") and self.rollout_running():
                continue
            if kind == "kill_generation" and self.site.broken_live:
                continue
            if kind == "slow_peers" and sum(t.is_alive() for t in self.slow_threads) >= 2:
                continue
            if kind == "malformed" and self.malformed_thread and self.malformed_thread.is_alive():
                continue
            return kind
        return None  # nothing eligible now (a --faults subset, all busy): skip this tick

    def inject(self, kind: str) -> None:
        getattr(self, "fault_" + kind)()

    def fault_kill_worker(self) -> None:
        master, workers = self.active_workers()
        if not workers:
            self.record("kill_worker", "", "skipped: no running worker found")
            return
        pid, s = self.rng.choice(workers)
        if signal_if_same(pid, s.start, signal.SIGKILL):
            self.kills.append(self.now())
            self.record("kill_worker", f"pid {pid}", "SIGKILL sent", pid=pid)
        else:
            self.record("kill_worker", f"pid {pid}", "skipped: gone before the signal")

    def fault_kill_generation(self) -> None:
        master, workers = self.active_workers()
        gens = {s.ppid for _pid, s in workers}
        gens = {g for g in gens if master and (ps := proc_stat(g)) and ps.ppid == master}
        if len(gens) != 1:
            self.record("kill_generation", "", f"skipped: active generation not found ({gens})")
            return
        gen = gens.pop()
        s = proc_stat(gen)
        if s and signal_if_same(gen, s.start, signal.SIGKILL):
            self.kills.append(self.now())
            self.record("kill_generation", f"pid {gen}", "SIGKILL sent", pid=gen)
        else:
            self.record("kill_generation", f"pid {gen}", "skipped: gone before the signal")

    def fault_stop_worker(self) -> None:
        _master, workers = self.active_workers()
        if len(workers) < 2:
            # Stopping the only running worker is worker-less by construction: not a finding.
            self.record("stop_worker", "", f"skipped: {len(workers)} running worker(s), need 2")
            return
        pid, s = self.rng.choice(workers)
        pause = self.rng.uniform(2, 5)
        if signal_if_same(pid, s.start, signal.SIGSTOP):
            with self.lock:
                self.stopped.append((time.monotonic() + pause, pid, s.start))
            self.record("stop_worker", f"pid {pid}", f"SIGSTOP, SIGCONT in {pause:.1f} s", pid=pid)
        else:
            self.record("stop_worker", f"pid {pid}", "skipped: gone before the signal")

    def continue_due(self, everything: bool = False) -> None:
        now = time.monotonic()
        with self.lock:
            due = [x for x in self.stopped if everything or x[0] <= now]
            self.stopped = [x for x in self.stopped if x not in due]
        for _at, pid, start in due:
            signal_if_same(pid, start, signal.SIGCONT)

    def fault_good_rollout(self) -> None:
        self._start_rollout("good")

    def fault_broken_rollout(self) -> None:
        self._start_rollout(self.rng.choice(self.broken_kinds))

    def _start_rollout(self, kind: str) -> None:
        version, rel = self.site.release(kind)
        if kind != "good":
            self.site.broken_live = True  # before the thread starts: choose() reads it
        entry = self.record(
            "good_rollout" if kind == "good" else "broken_rollout",
            f"{version}",
            "running",
            sub=kind,
        )
        self.rollout = threading.Thread(
            target=self._rollout, args=(kind, version, rel, entry), daemon=True, name="rollout"
        )
        self.rollout.start()

    def _rollout(self, kind: str, version: str, rel: Path, entry: dict[str, Any]) -> None:
        started = time.monotonic()
        self.site.switch(rel)
        rc, out, err = self.engine.run("graceful", timeout=BOOT_TIMEOUT * 3 + GRACEFUL_TIMEOUT + 90)
        line = (out.strip().splitlines() or err.strip().splitlines() or [""])[0]
        if kind == "good":
            if rc == 0:
                self.site.good = str(rel)
                self.last_good_version = version
        else:
            self.site.switch(Path(self.site.good))
            self.site.broken_live = False
        took = time.monotonic() - started
        expected = (rc == 0) if kind == "good" else (rc == 1)
        outcome = {
            "t": entry["t"],
            "kind": kind,
            "version": version,
            "exit": rc,
            "line": line,
            "seconds": round(took, 2),
            "as_expected": expected,
            "ended": round(self.now(), 3),
        }
        if not expected:
            outcome["stderr"] = err.strip()[-600:]
        entry["outcome"] = f"exit {rc}: {line}"
        with self.lock:
            self.rollouts.append(outcome)
        mark = "" if expected else "  <-- UNEXPECTED"
        print(
            f"  {self.now():7.2f} s  {'':15s} {version} exit {rc} ({took:.1f} s): {line}{mark}",
            flush=True,
        )

    def fault_ttin_ttou(self) -> None:
        master = self.master_pid()
        _rc, st = self.engine.status()
        nproc = int((st or {}).get("nproc") or 0)
        if not master or not nproc:
            self.record("ttin_ttou", "", "skipped: no master or nproc unknown")
            return
        with self.lock:
            paused = len(self.stopped)
        if nproc >= 4:
            sig = signal.SIGTTOU
        elif nproc <= 1 or nproc - 1 <= paused:
            # Never leave only SIGSTOPped workers: that is worker-less by construction.
            sig = signal.SIGTTIN
        else:
            sig = self.rng.choice([signal.SIGTTIN, signal.SIGTTOU])
        os.kill(master, sig)
        after = nproc + (1 if sig == signal.SIGTTIN else -1)
        self.record("ttin_ttou", sig.name, f"nproc {nproc} -> {after}", sub=sig.name)

    def fault_usr2(self) -> None:
        master = self.master_pid()
        if not master:
            self.record("usr2", "", "skipped: no master")
            return
        busy = " (a rollout runs: USR2 may be ignored)" if self.rollout_running() else ""
        os.kill(master, signal.SIGUSR2)
        entry = self.record("usr2", f"master {master}{busy}", "sent")

        def verify() -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.5)
                rc, st = self.engine.status()
                if st and st.get("pid") and st.get("generation"):
                    same = "same pid" if st["pid"] == master else f"NEW PID {st['pid']}"
                    entry["outcome"] = f"answering after {self.now() - entry['t']:.1f} s, {same}"
                    return
            entry["outcome"] = "NOT answering 10 s after USR2"

        t = threading.Thread(target=verify, daemon=True, name="usr2-verify")
        t.start()
        self.helpers.append(t)

    def fault_slow_peers(self) -> None:
        entry = self.record("slow_peers", "4 connections, 1 byte / 0.5 s", "running")
        t = threading.Thread(target=self._slow_peers, args=(entry,), daemon=True, name="slow")
        t.start()
        self.slow_threads.append(t)

    def _slow_peers(self, entry: dict[str, Any]) -> None:
        payload = slow_request()
        conns: list[socket.socket | None] = []
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(2.0)
            try:
                s.connect(str(self.sock))
                conns.append(s)
            except OSError:
                s.close()
        sent = [0] * len(conns)
        closed_at: list[float | None] = [None] * len(conns)
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < 20 and not self.slow_stop.is_set():
            if i >= len(payload) or not any(c is not None for c in conns):
                break
            for k, s in enumerate(conns):
                if s is None:
                    continue
                try:
                    s.send(payload[i : i + 1])
                    sent[k] += 1
                except OSError:
                    closed_at[k] = time.monotonic() - started
                    s.close()
                    conns[k] = None
            i += 1
            self.slow_stop.wait(0.5)
        for s in conns:
            if s is not None:
                s.close()
        held = time.monotonic() - started
        closed = [round(c, 1) for c in closed_at if c is not None]
        ours = "the run ended" if self.slow_stop.is_set() else "done"
        entry["outcome"] = (
            f"{len(sent)} connected, bytes sent {sent}; the server closed {len(closed)} "
            f"(after {closed} s); we closed the rest after {held:.1f} s ({ours})"
        )

    def fault_malformed(self) -> None:
        entry = self.record("malformed", "50 connections", "running")
        t = threading.Thread(target=self._malformed, args=(entry,), daemon=True, name="bad")
        t.start()
        self.malformed_thread = t

    def _malformed(self, entry: dict[str, Any]) -> None:
        rng = random.Random(self.rng.random())
        kinds: Counter[str] = Counter()
        errors = 0
        deadline = time.monotonic() + 15
        for n in range(50):
            if time.monotonic() > deadline:
                break
            kind = ("garbage", "bad_version", "truncated")[n % 3]
            if kind == "garbage":
                data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))
            elif kind == "bad_version":
                data = fcgi_record(1, struct.pack(">HB5x", 1, 1), version=rng.choice([0, 2, 255]))
            else:
                full = fcgi_record(1, struct.pack(">HB5x", 1, 1)) + fcgi_record(
                    4, b"\x05\x03HELLOabc" * 20
                )
                data = full[: rng.randint(1, len(full) - 1)]
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(1.0)
            try:
                s.connect(str(self.sock))
                s.sendall(data)
                kinds[kind] += 1
            except OSError:
                errors += 1
            finally:
                s.close()
        entry["outcome"] = f"sent {dict(kinds)}, {errors} connect/send errors"


# ---------------------------------------------------------------- set-up and report


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except Exception:  # noqa: BLE001 - polled until ready
            pass
        time.sleep(interval)
    return False


def http_ok(port: int, path: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", f"{path}/ready")
        return conn.getresponse().status == 200
    finally:
        conn.close()


def write_config(d: Path, site: Path) -> Path:
    cfg = d / "chaos.yml"
    cfg.write_text(
        "servers:\n"
        "  - name: chaos\n"
        '    app: "chaosapp:application"\n'
        f"    chdir: {site / 'current'}\n"
        "    health: /healthz\n"
        "    nproc: 2\n"
        f"    boot_timeout: {BOOT_TIMEOUT}\n"
        f"    graceful_timeout: {GRACEFUL_TIMEOUT}\n"
        f"    timeout: {STUCK_TIMEOUT}\n"
        f"    socket: {d / 'app.sock'}\n"
        f"    pidfile: {d / 'app.pid'}\n"
        f"    error_log: {d / 'engine.log'}\n"
    )
    return cfg


def log_lines(path: Path, words: tuple[str, ...]) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if any(w in line for w in words)]


def report(
    chaos: Chaos,
    load: Load,
    sampler: Sampler,
    load_seconds: float,
    start_m: tuple[int | None, int | None],
    end_m: tuple[int | None, int | None],
    master0: int | None,
    master1: int | None,
) -> dict[str, Any]:
    args = chaos.args
    ok_times = sorted(t for per in load.ok for t in per)
    gaps = [(b - a, a) for a, b in zip(ok_times, ok_times[1:], strict=False)]
    gap, gap_at = max(gaps) if gaps else (0.0, 0.0)
    kills = sorted(chaos.kills)
    fault_times = sorted((f["t"], f["kind"]) for f in chaos.faults)
    failures = sorted(load.failures, key=lambda f: f.t)
    for f in failures:
        f.in_flight = any(k <= f.t <= k + IN_FLIGHT_WINDOW for k in kills)
        before = [x for x in fault_times if x[0] <= f.t]
        if before:
            f.after = f"{before[-1][1]} at {before[-1][0]:.2f} s"
    in_flight = sum(f.in_flight for f in failures)
    other = len(failures) - in_flight
    versions: dict[str, list[float]] = {}
    for per in load.versions:
        for v, (first, count) in per.items():
            cur = versions.setdefault(v, [first, 0])
            cur[0] = min(cur[0], first)
            cur[1] += count
    counts: Counter[str] = Counter(f["kind"] for f in chaos.faults)
    sub: Counter[str] = Counter(f"{f['kind']}:{f['sub']}" for f in chaos.faults if f.get("sub"))
    skipped = Counter(f["kind"] for f in chaos.faults if str(f["outcome"]).startswith("skipped"))
    by_kind: dict[str, dict[str, Any]] = {}
    for r in chaos.rollouts:
        k = by_kind.setdefault(r["kind"], {"count": 0, "as_expected": 0, "unexpected": []})
        k["count"] += 1
        if r["as_expected"]:
            k["as_expected"] += 1
        else:
            k["unexpected"].append(r)
    for r in chaos.rollouts:
        if r["kind"] == "good" and r["exit"] == 0:
            first = versions.get(r["version"], [None])[0]
            r["first_served_after_s"] = None if first is None else round(first - r["t"], 2)
    s = sampler.samples
    worker_less_seconds = len(s.worker_less) * SAMPLE_INTERVAL
    engine_errors = log_lines(chaos.d / "engine.log", ("ERROR", "CRITICAL", "Traceback"))
    nginx_errors = log_lines(chaos.d / "nginx.err", ("[error]", "[crit]", "[alert]", "[emerg]"))
    good = by_kind.get("good", {"count": 0, "as_expected": 0})
    bad_n = sum(v["count"] for k, v in by_kind.items() if k != "good")
    bad_ok = sum(v["as_expected"] for k, v in by_kind.items() if k != "good")
    mb = lambda kb: f"{kb / 1024:.1f}" if kb else "?"  # noqa: E731
    summary = (
        f"`python3 bench/chaos.py --duration {args.duration:g} --seed {args.seed}"
        f"{'' if args.keep_conn == 'on' else ' --keep-conn off'}`: keep_conn {args.keep_conn}, "
        f"{args.clients} clients, {len(chaos.faults)} faults in {args.duration:g} s; "
        f"{len(ok_times):,} answered, {other} failed (+{in_flight} in flight on killed "
        f"processes); longest gap {gap * 1000:,.0f} ms; {worker_less_seconds:g} worker-less s; "
        f"rollouts {good['as_expected']}/{good['count']} good ok, {bad_ok}/{bad_n} broken "
        f"rolled back; master fds {start_m[1]} -> {end_m[1]}, RSS {mb(start_m[0])} -> "
        f"{mb(end_m[0])} MB"
    )
    return {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "seed": args.seed,
        "duration_s": args.duration,
        "load_seconds": round(load_seconds, 1),
        "keep_conn": args.keep_conn,
        "clients": args.clients,
        "answered": len(ok_times),
        "failed": len(failures),
        "failed_in_flight_on_killed": in_flight,
        "failed_other": other,
        "failures": [f.__dict__ for f in failures[:500]],
        "longest_gap_ms": round(gap * 1000, 1),
        "longest_gap_at_s": round(gap_at, 2),
        "worker_less_seconds": worker_less_seconds,
        "worker_less_samples": s.worker_less,
        "status_samples": s.total,
        "status_unanswered_samples": s.unanswered,
        "status_stale_snapshots": s.stale_snapshots,
        "master": {
            "pid_start": master0,
            "pid_end": master1,
            "pids_seen": sorted(s.master_pids),
            "fds_start": start_m[1],
            "fds_end": end_m[1],
            "fds_max": max(s.fds, default=None),
            "rss_kb_start": start_m[0],
            "rss_kb_end": end_m[0],
            "rss_kb_max": max(s.rss, default=None),
        },
        "faults_injected": dict(counts),
        "faults_by_subkind": dict(sub),
        "faults_skipped": dict(skipped),
        "sigkills_sent": len(kills),
        "rollouts_by_kind": by_kind,
        "rollouts": chaos.rollouts,
        "versions_served": {
            v: {"first_s": round(a, 2), "count": n} for v, (a, n) in versions.items()
        },
        "engine_log_errors": len(engine_errors),
        "engine_log_error_sample": engine_errors[-15:],
        "nginx_log_errors": len(nginx_errors),
        "nginx_log_error_sample": nginx_errors[-10:],
        "fault_log": chaos.faults,
        "summary": summary,
    }


def print_report(r: dict[str, Any]) -> None:
    m = r["master"]
    print("\n== chaos report ==")
    print(f"load: {r['load_seconds']} s, {r['clients']} clients, keep_conn {r['keep_conn']}")
    print(f"answered (2xx, checked): {r['answered']:,}")
    print(
        f"failed: {r['failed']} ({r['failed_in_flight_on_killed']} in flight on a killed process, "
        f"{r['failed_other']} other)"
    )
    for f in r["failures"][:40]:
        tag = "in-flight" if f["in_flight"] else "OTHER    "
        print(
            f"    {f['t']:8.3f} s {tag} {f['method']:4s} {f['status']:5s} {f['detail'][:90]}"
            f"  [after {f['after']}]"
        )
    if len(r["failures"]) > 40:
        print(f"    ... {len(r['failures']) - 40} more in the JSON")
    print(
        f"longest gap between answered requests: {r['longest_gap_ms']:,} ms "
        f"(at {r['longest_gap_at_s']} s)"
    )
    print(
        f"worker-less: {r['worker_less_seconds']:g} s ({len(r['worker_less_samples'])} of "
        f"{r['status_samples']} status samples); status unanswered or wrong (master alive): "
        f"{len(r['status_unanswered_samples'])}; stale snapshots (all listed workers gone, "
        f"next sample fine): {r['status_stale_snapshots']}"
    )
    for t, why in r["worker_less_samples"][:20]:
        print(f"    {t:8.2f} s {why}")
    for t, why in r["status_unanswered_samples"][:10]:
        print(f"    {t:8.2f} s {why}")
    print(
        f"master pid {m['pid_start']} -> {m['pid_end']}: fds {m['fds_start']} -> {m['fds_end']} "
        f"(max {m['fds_max']}), RSS {m['rss_kb_start']} -> {m['rss_kb_end']} kB "
        f"(max {m['rss_kb_max']})"
    )
    late = [f for f in r["fault_log"] if f["kind"] in ("usr2", "slow_peers", "malformed")]
    if late:
        print("outcomes of usr2 / slow_peers / malformed:")
    for f in late:
        print(f"    {f['t']:8.2f} s {f['kind']:10s} {f['outcome']}")
    print(f"faults injected: {r['faults_injected']} (SIGKILLs sent {r['sigkills_sent']})")
    print(f"  by subkind: {r['faults_by_subkind']}")
    if r["faults_skipped"]:
        print(f"  skipped (no target): {r['faults_skipped']}")
    for kind, k in sorted(r["rollouts_by_kind"].items()):
        want = "exit 0" if kind == "good" else "exit 1, rolled back"
        print(f"rollouts {kind:12s}: {k['as_expected']}/{k['count']} as expected ({want})")
        for u in k["unexpected"]:
            print(f"    UNEXPECTED at {u['t']} s: exit {u['exit']}: {u['line']}")
    slow = [x for x in r["rollouts"] if x["kind"] == "good" and x["exit"] == 0]
    if slow:
        after = [x.get("first_served_after_s") for x in slow]
        print(f"good releases first served after (s from rollout start): {after}")
    bad = [v for v in r["versions_served"] if not v.startswith("good-")]
    if bad:
        print(f"BROKEN RELEASES SERVED LIVE TRAFFIC: {bad}")
    print(
        f"engine log error lines: {r['engine_log_errors']}; "
        f"nginx error lines: {r['nginx_log_errors']}"
    )
    for line in r["engine_log_error_sample"][-5:]:
        print(f"    engine: {line[:160]}")
    for line in r["nginx_log_error_sample"][-5:]:
        print(f"    nginx: {line[:160]}")
    print("\nRESULTS.md line:")
    print(r["summary"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--keep-conn", choices=["on", "off"], default="on")
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--engine", help="the fcgi-engine command (default: fcgi-engine on PATH)")
    parser.add_argument("--keep-dir", action="store_true", help="keep the temp dir")
    parser.add_argument(
        "--faults", help=f"comma-separated subset of faults (default all: {','.join(FAULT_KINDS)})"
    )
    parser.add_argument(
        "--broken", help=f"comma-separated broken rollout kinds (default {','.join(BROKEN_KINDS)})"
    )
    args = parser.parse_args()
    for chosen, allowed in ((args.faults, FAULT_KINDS), (args.broken, BROKEN_KINDS)):
        if chosen and not set(chosen.split(",")) <= set(allowed):
            parser.error(f"unknown kind in {chosen!r}; known: {', '.join(allowed)}")
    if not 1 <= args.clients <= 64 or not 1 <= args.duration <= 7200:
        parser.error("--clients must be 1..64 and --duration 1..7200")
    nginx_bin = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if not nginx_bin:
        print("chaos: nginx is not installed (apt-get install -y nginx)", file=sys.stderr)
        return 2
    if args.engine:
        engine_cmd = shlex.split(args.engine)
    elif shutil.which("fcgi-engine"):
        engine_cmd = [shutil.which("fcgi-engine") or "fcgi-engine"]
    else:
        engine_cmd = [sys.executable, "-m", "fcgi_engine"]

    d = Path(tempfile.mkdtemp(prefix="fe-chaos-", dir="/tmp"))
    os.chmod(d, 0o755)
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    site = Site(d / "site")
    cfg = write_config(d, site.root)
    engine = Engine(engine_cmd, cfg, tag)
    version, rel = site.release("good")
    site.switch(rel)
    site.good = str(rel)
    chaos = Chaos(args, d, engine, site)
    chaos.last_good_version = version
    nginx: subprocess.Popen[bytes] | None = None
    load: Load | None = None
    sampler: Sampler | None = None
    code = 2
    print(
        f"chaos: dir {d}, engine {' '.join(engine_cmd)}, seed {args.seed}, "
        f"{args.duration:g} s, {args.clients} clients, keep_conn {args.keep_conn}",
        flush=True,
    )
    try:
        rc, out, err = engine.run("start", timeout=BOOT_TIMEOUT + 90)
        print(
            f"chaos: start exit {rc}: {(out.strip() or err.strip()).splitlines()[:1]}", flush=True
        )
        if rc != 0:
            print(err, file=sys.stderr)
            return 2
        port = free_port()
        (d / "nginx.conf").write_text(
            NGINX.format(
                d=d, sock=d / "app.sock", port=port, user="user root;" if os.geteuid() == 0 else ""
            )
        )
        nginx = subprocess.Popen(
            [nginx_bin, "-c", str(d / "nginx.conf"), "-p", str(d)],
            stdout=subprocess.DEVNULL,
            stderr=open(d / "nginx.stderr", "wb"),
        )
        path = f"/{args.keep_conn}"
        if not wait_until(lambda: http_ok(port, path), 20):
            print(
                "chaos: nginx does not answer 200 through the engine:\n"
                + (d / "nginx.stderr").read_text(errors="replace"),
                file=sys.stderr,
            )
            return 2
        master0 = chaos.master_pid()
        start_m = master_rss_fds(master0) if master0 else (None, None)
        chaos.t0 = time.monotonic()
        chaos.hard_stop = chaos.t0 + args.duration + 300
        load = Load(port, path, args.clients, chaos.t0, chaos.hard_stop)
        sampler = Sampler(chaos)
        sampler.start()
        for t in load.threads:
            t.start()
        end = chaos.t0 + args.duration
        next_fault = time.monotonic() + chaos.rng.uniform(1, 3)
        while time.monotonic() < end:
            chaos.continue_due()
            if time.monotonic() >= next_fault:
                kind = chaos.choose()
                if kind:
                    chaos.inject(kind)
                next_fault = time.monotonic() + chaos.rng.uniform(1, 3)
            time.sleep(0.05)
        print(f"  {chaos.now():7.2f} s  fault window over; settling", flush=True)
        settle_end = time.monotonic() + 150
        while time.monotonic() < settle_end and (chaos.stopped or chaos.rollout_running()):
            chaos.continue_due()
            time.sleep(0.1)
        chaos.slow_stop.set()
        for t in [*chaos.slow_threads, *chaos.helpers]:
            t.join(timeout=max(0.1, settle_end - time.monotonic()))
        if chaos.malformed_thread:
            chaos.malformed_thread.join(timeout=20)
        time.sleep(2.0)
        load.stop.set()
        for t in load.threads:
            t.join(timeout=REQUEST_TIMEOUT + 10)
        load_seconds = chaos.now()
        sampler.stop.set()
        sampler.join(timeout=10)
        master1 = chaos.master_pid()
        end_m = master_rss_fds(master1) if master1 else (None, None)
        r = report(chaos, load, sampler, load_seconds, start_m, end_m, master0, master1)
        print_report(r)
        if args.out:
            Path(args.out).write_text(json.dumps(r, indent=2, default=str) + "\n")
            print(f"chaos: report written to {args.out}")
        code = 1 if r["failed_other"] or r["worker_less_seconds"] > 0 else 0
        print(f"chaos: {'FAIL' if code else 'PASS'} (exit {code})")
        return code
    finally:
        chaos.slow_stop.set()
        if load is not None:
            load.stop.set()
        if sampler is not None:
            sampler.stop.set()
        chaos.continue_due(everything=True)
        rc, out, err = engine.run("stop", timeout=GRACEFUL_TIMEOUT + 40)
        print(f"chaos: stop exit {rc}: {(out.strip() or err.strip())[:200]}", flush=True)
        left = tagged_pids(tag)
        with chaos.lock:
            seen = dict(chaos.seen)
        for pid, start in seen.items():
            if signal_if_same(pid, start, signal.SIGKILL) and pid not in left:
                left.append(pid)
        for pid in left:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if left:
            print(f"chaos: killed {len(left)} leftover engine processes: {sorted(left)}")
        if nginx is not None and nginx.poll() is None:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.wait(10)
            except subprocess.TimeoutExpired:
                nginx.kill()
                nginx.wait(5)
        if load is not None:
            for t in load.threads:
                t.join(timeout=1)
        if args.keep_dir or code == 2:
            print(f"chaos: kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
