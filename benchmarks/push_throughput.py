"""Push-path throughput and latency: N runs delivered to /pubsub/push, C at a time.

    .venv/bin/python benchmarks/push_throughput.py --runs 200 --concurrency 10
    .venv/bin/python benchmarks/push_throughput.py --database-url postgresql://postgres@127.0.0.1/x

Uses the offline provider, so the figures are the service's own overhead (decode, claim,
checkpoints, aggregation, persistence), not an LLM's latency. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import tempfile
import time
import uuid

import httpx2

from app.main import create_app
from app.push.envelope import encode_wrapped
from app.settings import Settings


async def bench(runs: int, concurrency: int, database_url: str) -> None:
    settings = Settings(
        _env_file=None,
        database_url=database_url,
        llm_provider="offline",
        db_auto_migrate=True,
        log_level="ERROR",
        worker_max_concurrency=max(concurrency, 1),
        sweep_interval_seconds=3600,
    )
    app = create_app(settings)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    async with app.router.lifespan_context(app):
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://bench") as client:
            gate = asyncio.Semaphore(concurrency)

            async def one(index: int) -> None:
                body = encode_wrapped(
                    {"idea": f"Benchmark idea {index}: a shared tool library."},
                    uuid.uuid4().hex,
                    "projects/bench/subscriptions/bench",
                )
                async with gate:
                    started = time.perf_counter()
                    response = await client.post("/pubsub/push", content=body)
                    latencies.append(time.perf_counter() - started)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

            started = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(runs)))
            elapsed = time.perf_counter() - started

    latencies.sort()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"database            {database_url.split('://', 1)[0]}")
    print(f"runs / concurrency  {runs} / {concurrency}")
    print(f"statuses            {statuses}")
    print(f"wall time           {elapsed:.2f} s")
    print(f"throughput          {runs / elapsed:.1f} runs/s")
    print(f"latency p50         {statistics.median(latencies) * 1000:.1f} ms")
    print(f"latency p95         {latencies[int(len(latencies) * 0.95) - 1] * 1000:.1f} ms")
    print(f"latency max         {latencies[-1] * 1000:.1f} ms")
    print(f"peak RSS            {peak_mb:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    args = parser.parse_args()
    url = args.database_url or f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/bench.db"
    asyncio.run(bench(args.runs, args.concurrency, url))


if __name__ == "__main__":
    main()
