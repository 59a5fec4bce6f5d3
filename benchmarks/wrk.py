"""One wrk run, pinned to the client's CPU, read through a Lua ``done`` hook (no text scraping).

The hook only defines ``done``, so wrk keeps its fast path (no per-request Lua). It prints
one JSON object::

    {"requests": 271804, "duration_us": 5000931, "bytes": 94320188, "connect": 0, "read": 0,
     "write": 0, "status": 0, "timeout": 0, "p50_us": 180, "p99_us": 720}

``status`` counts non-2xx/3xx answers; the others are socket errors. wrk's default
timeout is 2 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.targets import CLIENT_CPU, pinned

DONE_HOOK = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\n{"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, '
    .. '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


class WrkError(RuntimeError):
    pass


@dataclass(frozen=True)
class Sample:
    requests: int
    seconds: float
    bytes: int
    errors: int           # socket errors + non-2xx/3xx
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def mib_s(self) -> float:
        return self.bytes / self.seconds / (1 << 20)

    def to_json(self) -> dict[str, float]:
        return {**asdict(self), "rps": round(self.rps, 1), "mib_s": round(self.mib_s, 1)}


class Wrk:
    """Runs wrk with the hook; ``close()`` removes the hook file."""

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="alive-bench-", suffix=".lua")
        os.write(fd, DONE_HOOK.encode())
        os.close(fd)
        self.hook = Path(name)

    def close(self) -> None:
        self.hook.unlink(missing_ok=True)

    def run(self, url: str, *, connections: int, seconds: float,
            close: bool = False) -> Sample:
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
                "-s", str(self.hook)]
        if close:
            argv += ["-H", "Connection: close"]
        out = _run(pinned(CLIENT_CPU, [*argv, url]), timeout=seconds + 30)
        for line in reversed(out.splitlines()):
            if line.startswith("{"):
                raw = json.loads(line)
                break
        else:
            raise WrkError(f"wrk printed no result for {url}:\n{out}")
        return Sample(
            requests=raw["requests"], seconds=raw["duration_us"] / 1e6, bytes=raw["bytes"],
            errors=sum(raw[k] for k in ("connect", "read", "write", "status", "timeout")),
            p50_ms=raw["p50_us"] / 1000, p99_ms=raw["p99_us"] / 1000)


def _run(argv: list[str], timeout: float) -> str:
    """Run wrk; on timeout or interruption end it by its PID before raising."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode != 0:
        raise WrkError(f"{' '.join(argv)} exited with {proc.returncode}:\n{out}")
    return out
