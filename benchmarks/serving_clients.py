"""The serving benchmark's two ends apart from its workloads: client worker processes that run
their share of a workload's requests with the official `openai` client and report per-request
timings (``time.monotonic``, one clock for every process), and the `kiln serve` process under test
with its /metrics scraper. ``benchmarks/bench_serving.py`` drives both.

    python benchmarks/serving_clients.py      # a client worker: JSON jobs on stdin, a JSON line per job
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request


# ================================================================================================
# The client worker: a process of its own that runs its share of a workload's requests with the
# openai client and reports per-request timings (time.monotonic, one clock for every process).
# ================================================================================================
def _variant_request(spec: dict) -> tuple[dict, dict]:
    """The openai keyword arguments and extra_body of one request spec."""
    kwargs = dict(spec.get("kwargs") or {})
    extra = {"ignore_eos": True, **(spec.get("extra") or {})}
    return kwargs, extra


async def _one_request(client, model: str, spec: dict, start_at: float, want_gaps: bool) -> dict:
    import openai

    delay = start_at + spec.get("at", 0.0) - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    kwargs, extra = _variant_request(spec)
    rec: dict = {"i": spec["i"], "t_send": time.monotonic(), "tokens": 0, "chunks": 0, "finish": []}
    first = last = None
    gaps: list[float] = []
    try:
        stream = await client.completions.create(
            model=model, prompt=spec["prompt"], max_tokens=spec["max_tokens"], temperature=spec.get("temperature", 0.0),
            stream=True, stream_options={"include_usage": True}, extra_body=extra, **kwargs)
        async for chunk in stream:
            now = time.monotonic()
            if chunk.choices:
                if first is None:
                    first = now
                elif want_gaps:
                    gaps.append(now - last)
                last = now
                rec["chunks"] += 1
                for c in chunk.choices:
                    if c.finish_reason:
                        rec["finish"].append(c.finish_reason)
            if chunk.usage is not None:
                rec["tokens"] = chunk.usage.completion_tokens
    except openai.APIStatusError as e:
        rec["status"] = e.status_code
        rec["error"] = f"HTTP {e.status_code}: {_short(e.message)}"
    except Exception as e:  # a stream that broke, an error event, a refused connection
        rec["error"] = f"{type(e).__name__}: {_short(str(e))}"
    rec["t_end"] = time.monotonic()
    rec["t_first"], rec["t_last"] = first, last
    if want_gaps:
        rec["gaps"] = [round(g, 6) for g in gaps]
    return rec


def _short(text: str, n: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


async def _run_job(job: dict) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=job["url"] + "/v1", api_key="none", max_retries=0, timeout=job["timeout"])
    try:
        return await asyncio.gather(*(_one_request(client, job["model"], s, job["start_at"], job["gaps"])
                                      for s in job["requests"]))
    finally:
        await client.close()


def _warm_client() -> None:
    """One streamed completion through the openai client against an in-process mock transport:
    its lazy imports and first-use model building happen here, not in the first timed request."""
    import openai

    try:
        import httpx2 as hx  # the HTTP library of newer openai releases
    except ImportError:
        import httpx as hx
    chunk = {"id": "w", "object": "text_completion", "created": 0, "model": "m",
             "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]}
    usage = {**chunk, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    body = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()

    def handler(request):
        return hx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    async def once():
        http = openai.DefaultAsyncHttpxClient(transport=hx.MockTransport(handler))
        client = openai.AsyncOpenAI(base_url="http://warm.invalid/v1", api_key="none", max_retries=0, http_client=http)
        try:
            for _ in range(2):
                stream = await client.completions.create(model="m", prompt=[1, 2], max_tokens=1, temperature=0.0, stream=True,
                                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                async for _c in stream:
                    pass
        finally:
            await client.close()

    try:
        asyncio.run(once())
    except Exception:  # a client without a mock transport still works, only its first request is slower
        pass


async def _warm_transport(url: str) -> None:
    """One real request (the model list) through the openai client's own HTTP stack: its first
    connection's lazy imports and set-up (tens of milliseconds) fall outside the timed requests.
    Nothing on the server's generation path runs."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    try:
        await client.models.list()
    finally:
        await client.close()


def worker_main() -> int:
    """``serving_clients.py`` run as a script: JSON jobs on stdin, one JSON result line per job."""
    _warm_client()  # imports openai: a worker without it exits here and the pool says so
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        job = json.loads(line)
        if job.get("cmd") == "exit":
            break
        try:
            if job.get("cmd") == "warm":
                asyncio.run(_warm_transport(job["url"]))
                out.write(json.dumps({"warmed": True}) + "\n")
                out.flush()
                continue
            res = asyncio.run(_run_job(job))
            out.write(json.dumps({"results": res}) + "\n")
        except Exception as e:  # the job itself failed (not one request): report it, keep serving
            out.write(json.dumps({"failed": f"{type(e).__name__}: {_short(str(e))}"}) + "\n")
        out.flush()
    return 0


class ClientPool:
    """Client worker processes; a workload's requests are dealt out among them round robin and all
    start at one moment (``start_at``, on the shared monotonic clock)."""

    def __init__(self, n: int):
        self.procs = []
        for _ in range(max(1, n)):
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, bufsize=1)
            self.procs.append(p)
        for p in self.procs:
            line = p.stdout.readline()
            if not line or not json.loads(line).get("ready"):
                self.close()
                raise RuntimeError("a client worker did not start: is the openai package installed?")

    def run(self, url: str, model: str, requests: list[dict], *, gaps: bool = False, timeout: float = 900.0,
            lead_s: float | None = None) -> tuple[list[dict], float]:
        """Runs ``requests`` (each: prompt, max_tokens, at, kwargs, extra); returns one record per
        request in order and the start time (``lead_s`` from now: time for every worker to read
        its share first)."""
        for i, r in enumerate(requests):
            r["i"] = i
        shares = [requests[k :: len(self.procs)] for k in range(len(self.procs))]
        if lead_s is None:
            lead_s = min(0.5, 0.05 + 0.002 * len(requests))
        start_at = time.monotonic() + lead_s
        used = []
        for p, share in zip(self.procs, shares):
            if share:
                job = {"url": url, "model": model, "requests": share, "start_at": start_at, "gaps": gaps, "timeout": timeout}
                p.stdin.write(json.dumps(job) + "\n")
                p.stdin.flush()
                used.append(p)
        out: list[dict] = []
        for p in used:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError("a client worker exited during a workload")
            msg = json.loads(line)
            if "failed" in msg:
                raise RuntimeError(f"a client worker failed: {msg['failed']}")
            out.extend(msg["results"])
        out.sort(key=lambda r: r["i"])
        return out, start_at

    def warm(self, url: str) -> None:
        """Each worker lists the server's models once with the openai client (see ``_warm_transport``)."""
        for p in self.procs:
            p.stdin.write(json.dumps({"cmd": "warm", "url": url}) + "\n")
            p.stdin.flush()
        for p in self.procs:
            msg = json.loads(p.stdout.readline() or "{}")
            if not msg.get("warmed"):
                raise RuntimeError(f"a client worker could not reach {url}: {msg.get('failed', 'it exited')}")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
                    p.stdin.flush()
                    p.wait(10)
                except (OSError, subprocess.TimeoutExpired):
                    p.kill()
                    p.wait()


# ================================================================================================
# The server under test
# ================================================================================================
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def parse_metrics(text: str) -> dict[str, float]:
    """Samples of Prometheus text: name (with its labels as written, ``name{k="v"}``) -> value."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            if "{" in line:
                head, _, rest = line.partition("}")
                parts = [head + "}", *rest.split()]
            else:
                parts = line.split()
            if len(parts) >= 2:
                try:
                    out[parts[0]] = float(parts[1])
                except ValueError:
                    pass
    return out


class Server:
    """A `kiln serve` subprocess on a free port, its output in ``log_path``."""

    def __init__(self, engine: str, log_path: str, api_server_count: int = 1, extra: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        cmd = [sys.executable, "-m", "kiln.launch.cli", "serve", engine, "--port", str(self.port),
               "--api-server-count", str(api_server_count), *(extra or [])]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if http_get(self.url + "/health", timeout=2)[0] == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"kiln serve did not become healthy in {timeout:.0f} s:\n{self.log_tail()}")

    def metrics(self) -> dict[str, float]:
        return parse_metrics(http_get(self.url + "/metrics")[1])

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 120.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def _cpu_s(path: str) -> float | None:
    """User + system CPU seconds of the process or thread whose /proc stat file is ``path``."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def process_roles(server_pid: int, client_pids: list[int]) -> dict[str, list[int]]:
    """The server's processes by role (engine core, API servers) and the client workers (Linux)."""
    from kiln.launch.procs import serve_roles

    return {**serve_roles(server_pid), "clients": list(client_pids)}


def cpu_snapshot(roles: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far: the engine core's main thread and its other threads, each API server,
    each client worker."""
    out: dict[str, float] = {}
    for pid in roles.get("core", []):
        main = _cpu_s(f"/proc/{pid}/task/{pid}/stat") or 0.0
        total = _cpu_s(f"/proc/{pid}/stat") or 0.0
        out["core_main_thread"] = out.get("core_main_thread", 0.0) + main
        out["core_other_threads"] = out.get("core_other_threads", 0.0) + total - main
    for role in ("api", "clients"):
        for i, pid in enumerate(roles.get(role, [])):
            v = _cpu_s(f"/proc/{pid}/stat")
            if v is not None:
                out[f"{role}{i}"] = v
    return out


def cpu_busy(a: dict[str, float], b: dict[str, float], wall: float) -> dict[str, float]:
    """The share of one CPU each process (or thread group) used between two snapshots."""
    return {k: round((b[k] - a.get(k, 0.0)) / wall, 3) for k in b if wall > 0}


_HOST = 'kiln_engine_host_seconds_total{phase="'


def host_phases_per_step(a: dict | None, b: dict | None) -> dict:
    """Milliseconds per engine step of each host phase, from two /metrics scrapes."""
    if not a or not b:
        return {}
    steps = b.get("kiln_engine_steps", 0.0) - a.get("kiln_engine_steps", 0.0)
    if steps <= 0:
        return {}
    out = {"steps": int(steps)}
    for k, v in b.items():
        if k.startswith(_HOST):
            out[k[len(_HOST):-2]] = round((v - a.get(k, 0.0)) / steps * 1000, 3)
    return out


class MetricsSampler:
    """Scrapes /metrics every ``every_s`` while a workload runs: the engine core's step count and
    busy seconds, requests running and waiting."""

    def __init__(self, server: Server, every_s: float = 0.2):
        self.server = server
        self.every_s = every_s
        self.samples: list[tuple[float, float, float, float, float]] = []
        self.first: dict[str, float] | None = None  # the first and last scrapes, whole
        self.last: dict[str, float] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self.first = self._scrape()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)
        self.last = self._scrape() or self.last

    def _scrape(self) -> dict | None:
        try:
            return self.server.metrics()
        except OSError:
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                m = self.server.metrics()
                self.samples.append((time.monotonic(), m.get("kiln_engine_steps", 0.0),
                                     m.get("kiln_engine_busy_seconds_total", m.get("kiln_engine_busy_seconds", 0.0)),
                                     m.get("kiln_requests_running", 0.0), m.get("kiln_requests_waiting", 0.0)))
            except OSError:
                pass
            self._stop.wait(self.every_s)

    def host_ms_per_step(self) -> dict:
        """The engine core's host milliseconds per step by phase (``kiln_engine_host_seconds``)
        between the first and last scrape."""
        return host_phases_per_step(self.first, self.last)

    def step_ms(self, batch: int) -> dict:
        """The engine core's busy time per step over the intervals that began and ended with
        ``batch`` requests running and none waiting (median of intervals, and pooled)."""
        per, steps, busy = [], 0.0, 0.0
        for a, b in zip(self.samples, self.samples[1:]):
            if a[3] == b[3] == batch and a[4] == b[4] == 0 and b[1] > a[1]:
                per.append((b[2] - a[2]) / (b[1] - a[1]) * 1000)
                steps += b[1] - a[1]
                busy += b[2] - a[2]
        return {"server_step_ms_p50": round(statistics.median(per), 3) if per else None,
                "server_step_ms_pooled": round(busy / steps * 1000, 3) if steps else None,
                "server_steps_counted": int(steps)}


if __name__ == "__main__":
    sys.exit(worker_main())
