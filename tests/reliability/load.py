"""A closed-loop load generator that records who answered every request.

``python -m tests.reliability.load URL --connections 64 --duration 10 --out samples.json``
runs ``connections`` workers, each posting one request after another to ``/invocations``
for ``duration`` seconds, and writes one sample per request: wall-clock send and receive
times (comparable across processes), status, the ``X-Model-Version`` that answered, and
the transport error if there was one. It runs as its own process so the test process,
which moves aliases and kills servers meanwhile, does not share its event loop or GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROW = {"inputs": [[0.25] * 64]}


async def _worker(
    session, url: str, body: bytes, headers: dict, until: float, samples: list
) -> None:
    import aiohttp

    while time.time() < until:
        sent = time.time()
        try:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                samples.append(
                    (
                        sent,
                        time.time(),
                        response.status,
                        response.headers.get("x-model-version"),
                        None,
                    )
                )
        except (TimeoutError, aiohttp.ClientError) as exc:
            samples.append((sent, time.time(), 0, None, f"{type(exc).__name__}: {exc}"))


async def run_load(url: str, connections: int, duration: float, token: str | None) -> list:
    """aiohttp, not httpx: httpx's async pool tops out near 150 requests/s at 64
    connections here, which would measure the client instead of the endpoint."""
    import aiohttp

    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    body = json.dumps(ROW).encode()
    samples: list = []
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        until = time.time() + duration
        await asyncio.gather(
            *(
                _worker(session, f"{url}/invocations", body, headers, until, samples)
                for _ in range(connections)
            )
        )
    return samples


@dataclass
class LoadResult:
    samples: list[tuple[float, float, int, str | None, str | None]]

    @property
    def sent(self) -> int:
        return len(self.samples)

    @property
    def failed(self) -> list:
        return [s for s in self.samples if s[2] != 200]

    def latency_ms(self, quantile: float) -> float:
        values = sorted((r - s) * 1000 for s, r, *_ in self.samples)
        return values[min(len(values) - 1, int(quantile * len(values)))] if values else 0.0

    def versions(self) -> set[str | None]:
        return {s[3] for s in self.samples}


class LoadProcess:
    """The generator as a child process: start it, do things, then :meth:`result`."""

    def __init__(
        self,
        url: str,
        out: Path,
        *,
        connections: int = 64,
        duration: float = 5.0,
        token: str | None = None,
    ) -> None:
        env = {**os.environ}
        if token:
            env["LOAD_TOKEN"] = token  # not on the command line, where ps shows it
        self.out = Path(out)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.reliability.load",
                url,
                "--connections",
                str(connections),
                "--duration",
                str(duration),
                "--out",
                str(self.out),
            ],
            env=env,
            cwd=Path(__file__).resolve().parents[2],
        )
        self.duration = duration

    def result(self) -> LoadResult:
        code = self.proc.wait(self.duration + 120)
        assert code == 0, f"load generator exited with {code}"
        return LoadResult([tuple(s) for s in json.loads(self.out.read_text())])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    samples = asyncio.run(
        run_load(args.url, args.connections, args.duration, os.environ.get("LOAD_TOKEN"))
    )
    Path(args.out).write_text(json.dumps(samples))


if __name__ == "__main__":
    main()
