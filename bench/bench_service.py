"""Load test for a running visrec service (bento/service.py); on demand, not part of the tests.

    bentoml serve bento.service:VisrecRecognition --port 3000 &      # VISREC_PARAMS=...
    python bench/bench_service.py --url http://127.0.0.1:3000 --requests 200
    python bench/bench_service.py --url http://127.0.0.1:3000 --requests 2000 --concurrency 16

For each concurrency level, N requests (POST /recognize, or /embed with --endpoint embed) are
sent from that many client threads, each with its own keep-alive connection and bodies encoded
once (:class:`KeepAliveClient`), and the table gives
requests/s, p50/p95/p99 latency and the error count (non-200 answers and connection errors).
Images: --image FILE (repeatable) or a few synthetic 224x224 JPEGs. Client and server share
the machine unless --url points elsewhere, so the client's CPU use is in the numbers.
"""

from __future__ import annotations

import argparse
import http.client
import io
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import requests
from PIL import Image
from urllib3 import encode_multipart_formdata


def synthetic_images(count: int = 4, size: int = 224) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, int(round(q / 100 * (len(sorted_values) - 1)))))
    return sorted_values[index]


class KeepAliveClient:
    """POSTs pre-encoded multipart bodies over one keep-alive ``http.client`` connection per
    thread: the load generator shares the cores with the service on one machine, so it spends
    as little CPU as it can (``requests`` building a multipart body per call cost 1.1 ms of
    CPU a request here, this 0.3)."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname, parts.port or 80, timeout
        self.local = threading.local()

    @staticmethod
    def bodies(images: list[bytes], field: str = "image") -> list[tuple[bytes, str]]:
        """Each image's multipart body and its content type, encoded once."""
        return [encode_multipart_formdata({field: (f"{i}.jpg", data, "image/jpeg")}) for i, data in enumerate(images)]

    def post(self, path: str, body: tuple[bytes, str]) -> tuple[int, bytes]:
        """(status, answer body); a connection error raises ``OSError`` / ``HTTPException``."""
        connection = getattr(self.local, "connection", None)
        if connection is None:
            connection = self.local.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            connection.request("POST", path, body=body[0], headers={"Content-Type": body[1]})
            answer = connection.getresponse()
            return answer.status, answer.read()
        except (OSError, http.client.HTTPException):
            connection.close()
            self.local.connection = None
            raise


def run_level(url: str, endpoint: str, images: list[bytes], concurrency: int, total: int,
              timeout: float) -> dict[str, float]:
    client = KeepAliveClient(url, timeout)
    bodies = client.bodies(images)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        start = time.perf_counter()
        try:
            status, text = client.post(f"/{endpoint}", bodies[i % len(bodies)])
            ok, detail = status == 200, f"HTTP {status}: {text[:120]!r}"
        except (OSError, http.client.HTTPException) as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - start
        with lock:
            (latencies.append(elapsed) if ok else errors.append(detail))

    wall = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(total)))
    wall = time.perf_counter() - wall
    latencies.sort()
    return {"concurrency": concurrency, "requests": total, "ok": len(latencies), "errors": len(errors),
            "rps": len(latencies) / wall if wall else float("nan"),
            "p50": percentile(latencies, 50) * 1000, "p95": percentile(latencies, 95) * 1000,
            "p99": percentile(latencies, 99) * 1000,
            "mean": (statistics.fmean(latencies) * 1000) if latencies else float("nan"),
            "first_error": errors[0] if errors else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="the service's base URL")
    parser.add_argument("--endpoint", choices=["recognize", "embed"], default="recognize")
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--image", type=Path, action="append", default=[], help="image file(s) to send")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()

    url = args.url.rstrip("/")
    ready = requests.get(f"{url}/readyz", timeout=10)
    if ready.status_code != 200:
        raise SystemExit(f"{url}/readyz answered {ready.status_code}: is the service up?")
    images = [p.read_bytes() for p in args.image] or synthetic_images()
    if args.warmup:
        run_level(url, args.endpoint, images, 1, args.warmup, args.timeout)

    print(f"POST {url}/{args.endpoint}, {args.requests} requests per level, {len(images)} distinct image(s)")
    print(f"{'conc':>5} {'ok':>6} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    total_errors = 0
    for level in args.concurrency:
        r = run_level(url, args.endpoint, images, level, args.requests, args.timeout)
        total_errors += int(r["errors"])
        print(f"{r['concurrency']:>5} {r['ok']:>6} {r['errors']:>6} {r['rps']:>8.1f} {r['p50']:>8.1f} "
              f"{r['p95']:>8.1f} {r['p99']:>8.1f} {r['mean']:>8.1f}")
        if r["first_error"]:
            print(f"      first error: {r['first_error']}")
    print(f"total errors: {total_errors}")
    if total_errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
