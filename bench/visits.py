"""VISITS: the job as clients really send it, one visit of 5 photos, from 1, 64 or 256 clients at once.

Each client submits a job, then follows it to its end, and submits the next: by polling ``GET /api/status``
every 50 ms (``poll``), or by waiting (``wait``: ``Prefer: wait=30`` and ``If-None-Match``, RFC 7240, answered
when the status changes or the time is up). A job's latency is from the start of its submit to the client
seeing it completed; its floor is the wait itself, the slowest of 5 waits of 0.1-0.4 s (median 361 ms).

The clients are one libcurl multi handle in this process (a few tens of microseconds of CPU per request), so
the client is not what limits the figures; the service's CPU is read from /proc for the daemon's process tree
and the API's apart (bench.py, Sampler), over the measured window only (after a warm-up), per job finished.
"""
from __future__ import annotations

import heapq
import io
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import pycurl

#: The floor of a job of 5 images: the median of the slowest of 5 uniform 0.1-0.4 s waits (0.1 + 0.3 * 0.5**0.2).
FLOOR_MS = (0.1 + 0.3 * 0.5 ** 0.2) * 1000
POLL_S = 0.05
WAIT_S = 30
IMAGES_PER_JOB = 5


@dataclass
class _Client:
    number: int
    curl: pycurl.Curl
    body: io.BytesIO = field(default_factory=io.BytesIO)
    headers: dict = field(default_factory=dict)
    job_id: int | None = None
    started: float = 0.0  # perf_counter at the start of the current job's submit
    submitted: float = 0.0
    etag: str | None = None
    requests: int = 0


def _header_line(client: _Client, line: bytes) -> None:
    name, sep, value = line.decode("latin-1").partition(":")
    if sep:
        client.headers[name.strip().lower()] = value.strip()


class Clients:
    """``n`` clients over one libcurl multi handle, each a loop of submit -> follow -> submit."""

    def __init__(self, base: str, payloads, n: int, mode: str):
        self.base, self.payloads, self.mode = base, payloads, mode
        self.multi = pycurl.CurlMulti()
        self.timers: list[tuple[float, int]] = []  # (perf_counter due, client number): polls waiting to go
        self.done: list[dict] = []  # one row per finished job: started, seen finished, submit ms, requests
        self.failed = 0
        self.waits_applied = 0
        self.clients = [self._client(i) for i in range(n)]
        self.by_curl = {id(client.curl): client for client in self.clients}
        for client in self.clients:
            self._submit(client)

    def _client(self, number: int) -> _Client:
        curl = pycurl.Curl()
        client = _Client(number, curl)
        curl.setopt(pycurl.WRITEDATA, client.body)
        curl.setopt(pycurl.HEADERFUNCTION, lambda line, c=client: _header_line(c, line))
        curl.setopt(pycurl.TIMEOUT, 120)
        curl.setopt(pycurl.NOSIGNAL, 1)
        return client

    def _start(self, client: _Client, url: str, post: bytes | None = None, headers: list[str] = ()) -> None:
        curl = client.curl
        client.body.seek(0)
        client.body.truncate()
        client.headers = {}
        curl.setopt(pycurl.URL, url)
        if post is not None:
            curl.setopt(pycurl.POSTFIELDS, post)
        else:
            curl.setopt(pycurl.HTTPGET, 1)
        curl.setopt(pycurl.HTTPHEADER, list(headers))
        client.requests += 1
        self.multi.add_handle(curl)

    def _submit(self, client: _Client) -> None:
        client.job_id, client.etag, client.requests = None, None, 0
        client.started = time.perf_counter()
        self._start(client, self.base + "/api/submit/", json.dumps(next(self.payloads)).encode(),
                    ["Content-Type: application/json"])

    def _follow(self, client: _Client) -> None:
        headers = []
        if self.mode == "wait":
            headers.append(f"Prefer: wait={WAIT_S}")
            if client.etag:
                headers.append(f"If-None-Match: {client.etag}")
        self._start(client, f"{self.base}/api/status?jobid={client.job_id}", headers=headers)

    def _answered(self, client: _Client) -> None:
        code = client.curl.getinfo(pycurl.RESPONSE_CODE)
        now = time.perf_counter()
        if client.job_id is None:  # the submit's answer
            if code != 201:
                self.failed += 1
                self._submit(client)
                return
            client.job_id = json.loads(client.body.getvalue())["job_id"]
            client.submitted = now
            self._follow(client)
            return
        if code == 304:  # the wait ran out, nothing changed
            self._follow(client)
            return
        doc = json.loads(client.body.getvalue())
        client.etag = client.headers.get("etag")
        waited = "preference-applied" in client.headers
        self.waits_applied += waited
        if doc.get("status") in ("completed", "failed"):
            self.failed += doc["status"] == "failed"
            self.done.append({"started": client.started, "seen": now, "submit_ms": (client.submitted - client.started)
                              * 1000, "requests": client.requests, "job_id": client.job_id})
            self._submit(client)
        elif self.mode == "wait" and waited:
            self._follow(client)
        else:  # polling, or a server that does not wait: look again in 50 ms
            heapq.heappush(self.timers, (now + POLL_S, client.number))

    def run(self, seconds: float) -> None:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            now = time.perf_counter()
            while self.timers and self.timers[0][0] <= now:
                self._follow(self.clients[heapq.heappop(self.timers)[1]])
            timeout = min([0.05, *(max(0.0, due - now) for due, _ in self.timers[:1])])
            self.multi.select(timeout)
            while self.multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
                pass
            while True:
                queued, ok, errors = self.multi.info_read()
                for curl in ok:
                    self.multi.remove_handle(curl)
                    self._answered(self.by_curl[id(curl)])
                for curl, _errno, message in errors:
                    self.multi.remove_handle(curl)
                    self.failed += 1
                    self._submit(self.by_curl[id(curl)])
                if not queued:
                    break

    def close(self) -> None:
        for client in self.clients:
            try:
                self.multi.remove_handle(client.curl)
            except pycurl.error:
                pass
            client.curl.close()
        self.multi.close()


def payloads(bench, rng: random.Random):
    """Endless jobs of one visit of 5 small and medium photos, every format, distinct URLs each."""
    names = [n for tier in ("small", "medium") for n in bench.corpus.names(tier, bench.args.formats)]
    count = 0
    while True:
        count += 1
        tag = f"v{time.time_ns()}-{count}"
        yield {"count": 1, "visits": [{"store_id": rng.choice(bench.store_ids), "visit_time": "2026-12-04T10:00:00Z",
                                       "image_url": [bench.corpus.url(rng.choice(names), tag)
                                                     for _ in range(IMAGES_PER_JOB)]}]}


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))] if values else float("nan")


def visits(bench, clients: int, mode: str, seconds: float = 10.0, warm_up_s: float = 3.0) -> dict:
    """One run: ``clients`` clients for warm_up_s, then the measured window of ``seconds``."""
    crowd = Clients(bench.base, payloads(bench, random.Random(clients)), clients, mode)
    try:
        crowd.run(warm_up_s)
        supervisor = bench.service.daemon.pid
        daemon0, api0, t0 = bench.sampler.cpu_s("daemon"), bench.sampler.cpu_s("api"), time.perf_counter()
        super0 = bench.sampler.cpu_of("daemon", supervisor)
        crowd.done.clear()
        crowd.run(seconds)
        daemon1, api1, t1 = bench.sampler.cpu_s("daemon"), bench.sampler.cpu_s("api"), time.perf_counter()
        super1 = bench.sampler.cpu_of("daemon", supervisor)
    finally:
        crowd.close()
    rows = [row for row in crowd.done if row["started"] >= t0]  # jobs started and finished in the window
    jobs = len(crowd.done)
    right = exposed = 0
    for row in crowd.done:  # after the window (its requests are not in the CPU figures): every job's perimeters
        check = bench.kit.check_results(bench.corpus, bench.http.get(
            bench.base + "/api/results", params={"jobid": row["job_id"]}, timeout=120).json())
        right, exposed = right + (check or {}).get("correct", 0), exposed + (check or {}).get("exposed", 0)
    latencies = [(row["seen"] - row["started"]) * 1000 for row in rows]
    submits = [row["submit_ms"] for row in rows]
    return {"workload": f"VISITS-{clients}-{mode}", "clients": clients, "mode": mode, "jobs": jobs,
            "jobs_per_s": jobs / (t1 - t0), "latency_p50_ms": pct(latencies, 50), "latency_p99_ms": pct(latencies, 99),
            "floor_ms": round(FLOOR_MS), "submit_p50_ms": pct(submits, 50), "submit_p99_ms": pct(submits, 99),
            "daemon_cpu_ms_per_job": (daemon1 - daemon0) * 1000 / max(jobs, 1),
            "api_cpu_ms_per_job": (api1 - api0) * 1000 / max(jobs, 1),
            "supervisor_cpu_ms_per_job": (super1 - super0) * 1000 / max(jobs, 1),  # of the daemon's figure
            "requests_per_job": statistics.mean(row["requests"] for row in rows) if rows else float("nan"),
            "failed": crowd.failed, "waits_applied": crowd.waits_applied, "correct": f"{right}/{exposed}"}
