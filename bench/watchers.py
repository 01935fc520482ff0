"""Watchers benchmark: 1,000 event streams and 200 long polls on running jobs, through the real stack,
served by gunicorn's gevent worker and by the old thread pool (gthread, 2 processes x 8 threads), side by side.

    make bench-watchers    # or: python bench/watchers.py [--streams 1000] [--polls 200] [--jobs 20]

For each setup, on the same Redis and worker (a random BLOOM slow enough that a job runs for tens of
seconds): the web is timed idle first (submit, GET /healthz, GET /api/v1/jobs/<id>); then long jobs start,
the crowd of streams and long polls opens on them (tests/watchers.py: asyncio in a child process), and the
same requests are timed while it is open, with the web processes' resident memory. Afterwards every stream
must have received every token event of its job in order and the final ``done`` event with the same text.
Prints a table and appends it, with the command, date and machine, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import requests  # noqa: E402

from bench.common import STACK_DEFAULTS, machine, pct, seconds_between, web_up  # noqa: E402
from tests.support import RedisServer, free_port, live_workers, start_web, start_worker, wait_for  # noqa: E402
from tests.watchers import Crowd, Outcome, raise_fd_limit  # noqa: E402
from web.http.watchers import watchers_key  # noqa: E402

LOGS = ROOT / "test-artifacts" / "bench-watchers"
SETUPS = {
    "gevent": {},  # config/gunicorn.conf.py as it is
    "gthread": {"GUNICORN_CMD_ARGS": "--worker-class gthread --threads 8"},  # the setup before issue 10
}
# The bench measures capacity, not the caps: every watcher comes from one address and is let in.
WEB_ENV = {"BLOOMQ_WEB_WORKERS": "2", "BLOOMQ_WEB_CONNECTIONS": "3000", "BLOOMQ_MAX_WATCHERS": "3000",
           "BLOOMQ_MAX_WATCHERS_PER_KEY": "100000", "BLOOMQ_LOG_LEVEL": "WARNING"}
PROBE_TIMEOUT = 5.0  # seconds before a timed request counts as an error


@dataclass
class Probe:
    """Latencies (ms) of one kind of request, and how many failed or timed out."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    def p(self, q: float) -> float | None:
        return pct(self.latencies, q) if self.latencies else None


@dataclass
class Phase:
    """What one setup measured."""

    idle: dict[str, Probe]
    loaded: dict[str, Probe]
    outcomes: list[Outcome]
    answered: int
    held: int
    running_after: int | None
    rss_idle: float
    rss_loaded: float
    web_cores: float
    jobs_wall: float
    machine_idle: float  # cores busy machine-wide (all processes) while the idle figures were taken
    machine_loaded: float  # the same while the watchers were open


def timed(call: Callable[[], requests.Response], seconds: float, probe: Probe, stop: threading.Event) -> None:
    """Repeat ``call`` for ``seconds``, recording each latency (or an error)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.is_set():
        started = time.perf_counter()
        try:
            call().raise_for_status()
        except requests.RequestException:
            probe.errors += 1
        else:
            probe.latencies.append(1000 * (time.perf_counter() - started))
        time.sleep(0.05)


def measure(base: str, job_id: str, seconds: float) -> dict[str, Probe]:
    """Submissions, /healthz and job reads, each from its own client, for ``seconds``."""
    sessions = [requests.Session() for _ in range(3)]
    body = {"inputs": "timed submission", "parameters": {"max_new_tokens": 1}}
    calls = {
        "submit": lambda: sessions[0].post(f"{base}/api/v1/jobs", json=body, timeout=PROBE_TIMEOUT),
        "healthz": lambda: sessions[1].get(f"{base}/healthz", timeout=PROBE_TIMEOUT),
        "get": lambda: sessions[2].get(f"{base}/api/v1/jobs/{job_id}", timeout=PROBE_TIMEOUT),
    }
    probes = {name: Probe() for name in calls}
    stop = threading.Event()
    with ThreadPoolExecutor(len(calls)) as pool:
        for name, call in calls.items():
            pool.submit(timed, call, seconds, probes[name], stop)
    return probes


def web_usage(pid: int) -> tuple[float, float]:
    """Resident memory (MiB) and CPU time so far (s) of the gunicorn master ``pid`` and its workers."""
    total_kib, cpu_ticks = 0, 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(entry.name) == pid or int(fields[1]) == pid:
            total_kib += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            cpu_ticks += int(fields[11]) + int(fields[12])  # utime + stime
    return total_kib / 1024, cpu_ticks / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (all cores)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    tick = os.sysconf("SC_CLK_TCK")
    return (total - idle) / tick, total / tick


def cores_busy(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Average cores busy between two ``machine_busy`` readings."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return (os.cpu_count() or 1) * busy / total if total else 0.0


def run_phase(args: argparse.Namespace, name: str, redis_url: str, model: Path, client: redis.Redis) -> Phase:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # A worker per setup, started with its web, so both run the same code.
    worker = start_worker(redis_url, str(model), LOGS / f"worker-{name}.log", BLOOMQ_LOG_LEVEL="WARNING",
                          **STACK_DEFAULTS)
    web = start_web(redis_url, str(model), LOGS / f"web-{name}.log", port, **WEB_ENV, **SETUPS[name])
    try:
        wait_for(lambda: web_up(base), timeout=30, what=f"the {name} web")
        wait_for(lambda: live_workers(base) >= 1, timeout=300, what="the worker")
        probe_job = _submit(base, "probe", 1)
        machine_before = machine_busy()
        idle = measure(base, probe_job, args.idle_seconds)
        machine_idle = cores_busy(machine_before, machine_busy())
        rss_idle, _ = web_usage(web.pid)
        jobs = [_submit(base, f"Story {i}: once upon a time", args.max_new_tokens) for i in range(args.jobs)]
        wait_for(lambda: _count_running(base, jobs) == len(jobs), timeout=120, interval=0.5, what="the long jobs")
        streams = [jobs[i % len(jobs)] for i in range(args.streams)]
        polls = [jobs[i % len(jobs)] for i in range(args.polls)]
        print(f"[{name}] {len(jobs)} jobs running; opening {len(streams)} streams and {len(polls)} long polls",
              flush=True)
        with Crowd(base, streams, polls, poll_wait=60, timeout=args.watch_timeout, patience=args.patience) as crowd:
            answered, held = settle(lambda: (crowd.answered, _held(client)), (len(streams), len(streams) + len(polls)),
                                    args.open_seconds)
            print(f"[{name}] {answered} streams answered, {held} watchers held by the web; measuring", flush=True)
            cpu_before, started = web_usage(web.pid)[1], time.monotonic()
            machine_before = machine_busy()
            loaded = measure(base, jobs[0], args.load_seconds)
            machine_loaded = cores_busy(machine_before, machine_busy())
            rss_loaded, cpu_after = web_usage(web.pid)
            web_cores = (cpu_after - cpu_before) / (time.monotonic() - started)
            running_after = _count_running(base, jobs)
            outcomes = crowd.results(timeout=args.watch_timeout + 60)
        wait_for(lambda: _count_running(base, jobs) == 0, timeout=600, interval=1, what="the long jobs to end")
        return Phase(idle, loaded, outcomes, answered, held, running_after, rss_idle, rss_loaded, web_cores,
                     _wall(base, jobs), machine_idle, machine_loaded)
    finally:
        web.stop(timeout=20)
        worker.stop()
        wait_for(lambda: not client.keys("bloomq:worker:*"), timeout=60, what="the worker to withdraw")
        client.delete(watchers_key("127.0.0.1"))


def settle(progress: Callable[[], tuple[int, int]], full: tuple[int, int], seconds: float) -> tuple[int, int]:
    """Wait until ``progress()`` reaches ``full``, stops moving for 5 s (a full thread pool), or ``seconds``."""
    deadline, last, since = time.monotonic() + seconds, None, time.monotonic()
    while True:
        now, current = time.monotonic(), progress()
        if current != last:
            last, since = current, now
        if all(c >= f for c, f in zip(current, full, strict=True)) or now - since > 5 or now > deadline:
            return current
        time.sleep(0.5)


def _submit(base: str, prompt: str, max_new_tokens: int) -> str:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "do_sample": False}}
    response = requests.post(f"{base}/api/v1/jobs", json=body, timeout=30)
    response.raise_for_status()
    return response.json()["id"]


def _count_running(base: str, jobs: list[str]) -> int | None:
    try:
        return sum(requests.get(f"{base}/api/v1/jobs/{j}", timeout=PROBE_TIMEOUT).json()["status"] == "running"
                   for j in jobs)
    except requests.RequestException:
        return None  # the web did not answer in time (its threads are all taken)


def _wall(base: str, jobs: list[str]) -> float:
    """Seconds from the first long job's creation to the last one's end."""
    records = [requests.get(f"{base}/api/v1/jobs/{j}", timeout=30).json() for j in jobs]
    return max(seconds_between(min(r["created_at"] for r in records), r["finished_at"]) for r in records)


def _held(client: redis.Redis) -> int:
    return client.zcard(watchers_key("127.0.0.1"))


def slow_model(model_dir: Path) -> Path:
    """A random BLOOM slow enough on a CPU (about 10 ms a token alone) for jobs of tens of seconds."""
    from worker.model.tiny import build_tiny_bloom

    if (model_dir / "config.json").exists():
        return model_dir
    return build_tiny_bloom(model_dir, hidden_size=512, n_layer=8, n_head=8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--polls", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=20, help="long jobs the watchers follow")
    parser.add_argument("--max-new-tokens", type=int, default=800, help="length of the long jobs")
    parser.add_argument("--idle-seconds", type=float, default=10)
    parser.add_argument("--load-seconds", type=float, default=20)
    parser.add_argument("--open-seconds", type=float, default=60, help="how long the crowd may take to get in")
    parser.add_argument("--watch-timeout", type=float, default=400, help="a stream gives up after this long")
    parser.add_argument("--patience", type=float, default=30,
                        help="a stream silent this long (no keep-alive either) is dead; a long poll waits 60 s + this")
    parser.add_argument("--setups", default="gevent,gthread")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()

    raise_fd_limit(4 * (args.streams + args.polls) + 1024)  # inherited by redis-server, the web and the crowd
    model = slow_model(ROOT / ".models" / "watchers-bloom")
    LOGS.mkdir(parents=True, exist_ok=True)
    for old in LOGS.glob("*.log"):
        old.unlink()
    redis_server = RedisServer(Path(tempfile.mkdtemp(prefix="bloomq-watchers-"))).start()
    client = redis.Redis.from_url(redis_server.url)
    phases: dict[str, Phase] = {}
    try:
        for name in args.setups.split(","):
            phases[name] = run_phase(args, name, redis_server.url, model, client)
    finally:
        redis_server.stop()
    table = render(args, phases)
    print(table)
    if not args.no_record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as out:
            out.write("\n" + table)
    gevent = phases.get("gevent")
    return 0 if gevent is None or not any(o.error for o in gevent.outcomes) else 1


def render(args: argparse.Namespace, phases: dict[str, Phase]) -> str:
    names = list(phases)
    command = " ".join(["python bench/watchers.py", *sys.argv[1:]])
    lines = [
        f"## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC — `{command}`",
        "",
        f"Machine: {machine()} (2 CPU cores, no GPU here). Model: random BLOOM (hidden 512, 8 layers) on one "
        f"CPU worker; {args.jobs} greedy jobs of {args.max_new_tokens} new tokens, {args.streams} event streams "
        f"and {args.polls} long polls (`?wait=60`) spread over them, opened at once from one asyncio client. "
        f"Timed requests: one client each for submit / `GET /healthz` / `GET /api/v1/jobs/<id>`, "
        f"{args.idle_seconds:g} s idle, then {args.load_seconds:g} s with the watchers open; a request over "
        f"{PROBE_TIMEOUT:g} s is an error. gevent: `config/gunicorn.conf.py` (2 processes, "
        f"{WEB_ENV['BLOOMQ_WEB_CONNECTIONS']} connections each); gthread: the same with "
        f"`{SETUPS['gthread']['GUNICORN_CMD_ARGS']}` (2 processes x 8 threads, as before).",
        "",
        "| | " + " | ".join(names) + (" | gevent / gthread |" if len(names) == 2 else " |"),
        "|---|" + "---:|" * (len(names) + (1 if len(names) == 2 else 0)),
    ]

    def row(label: str, values: list[float | None], fmt: str = "{:.0f}", ratio: bool = False) -> None:
        cells = ["—" if v is None else fmt.format(v) for v in values]
        extra = []
        if len(values) == 2:
            a, b = values
            extra = [f"{a / b:.1f}×" if ratio and a is not None and b else ""]
        lines.append(f"| {label} | " + " | ".join(cells + extra) + " |")

    ph = [phases[n] for n in names]
    row(f"streams complete (of {args.streams}): every token in order + done", [_ok(p, "stream") for p in ph],
        ratio=True)
    row(f"long polls answered 200 (of {args.polls})", [_ok(p, "poll") for p in ph], ratio=True)
    row(f"streams answered within {args.open_seconds:g} s", [p.answered for p in ph])
    row("watchers held by the web while measuring", [p.held for p in ph])
    row(f"long jobs still running when measuring ended (of {args.jobs}; — = no answer)",
        [p.running_after for p in ph])
    row("long jobs' wall time s (first created → last finished)", [p.jobs_wall for p in ph])
    row("watcher errors (timeouts, HTTP errors, incomplete)", [_failed(p) for p in ph])
    tail = " | |" if len(ph) == 2 else " |"
    for probe, label in (("submit", "submit"), ("healthz", "`GET /healthz`"), ("get", "`GET /api/v1/jobs/<id>`")):
        for when in ("idle", "with watchers open"):
            cells = [_pair(p.idle[probe] if when == "idle" else p.loaded[probe]) for p in ph]
            lines.append(f"| {label} {when}, p50 / p95 ms | " + " | ".join(cells) + tail)
    lines.append("| timed requests failed, idle / with watchers open | " + " | ".join(
        f"{_errors(p.idle)} / {_errors(p.loaded)} (of {_count(p.idle)} / {_count(p.loaded)})" for p in ph) + tail)
    row("web RSS MiB (all processes), idle", [p.rss_idle for p in ph])
    row("web RSS MiB (all processes), with watchers open", [p.rss_loaded for p in ph])
    row("web CPU with watchers open (cores busy, of 2)", [p.web_cores for p in ph], "{:.2f}")
    row("whole machine CPU while idle figures were taken (cores busy, of 2)", [p.machine_idle for p in ph], "{:.2f}")
    row("whole machine CPU with watchers open (cores busy, of 2)", [p.machine_loaded for p in ph], "{:.2f}")
    lines.append("")
    for name, phase in phases.items():
        kinds = Counter(_kind(o.error) for o in phase.outcomes if o.error)
        if kinds:
            lines.append(f"- {name} watcher errors: " + ", ".join(f"{n} {k}" for k, n in kinds.most_common()))
    if "gevent" in phases:
        g = phases["gevent"]
        lines.append(
            f"- Targets (gevent): submit p50/p95 with watchers open ≤ 2× idle — "
            f"{_ratio(g.loaded['submit'], g.idle['submit'], 50)} / {_ratio(g.loaded['submit'], g.idle['submit'], 95)}; "
            f"`/healthz` p95 {_fmt(g.loaded['healthz'].p(95))} ms and job read p95 {_fmt(g.loaded['get'].p(95))} ms "
            f"(≤ 50 ms); watcher errors {_failed(g)} (0)."
        )
    lines.append("")
    return "\n".join(lines)


def _pair(probe: Probe) -> str:
    return f"{_fmt(probe.p(50))} / {_fmt(probe.p(95))}"


def _ok(phase: Phase, kind: str) -> int:
    return sum(1 for o in phase.outcomes if o.kind == kind and not o.error)


def _failed(phase: Phase) -> int:
    return sum(1 for o in phase.outcomes if o.error)


def _errors(probes: dict[str, Probe]) -> int:
    return sum(p.errors for p in probes.values())


def _count(probes: dict[str, Probe]) -> int:
    return sum(p.errors + len(p.latencies) for p in probes.values())


def _kind(error: str) -> str:
    return error.split(":", 1)[0].split(" after ", 1)[0]


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _ratio(loaded: Probe, idle: Probe, q: float) -> str:
    a, b = loaded.p(q), idle.p(q)
    return "—" if a is None or not b else f"{a / b:.2f}×"


if __name__ == "__main__":
    # A SIGTERM ends the run through the normal exit path, so the processes it started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
