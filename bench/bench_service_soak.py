"""Soak / memory benchmark for a running visrec service; on demand, not part of the tests.

    VISREC_ADMIN_TOKEN=t bentoml serve bento.service:VisrecRecognition --port 3000 &
    python bench/bench_service_soak.py --url http://127.0.0.1:3000 --requests 10000 --token t
    python bench/bench_service_soak.py --url http://127.0.0.1:3000 --mix embed --requests 6000

Sends N requests from ``--concurrency`` client threads (keep-alive sessions). ``--mix mixed``
(default): /recognize, /embed, /gallery/add + /gallery/remove pairs (with ``--token``) and bad
inputs (not an image, wrong field, a 300-character file name) that must get a 4xx; ``--mix embed``: only
/embed (the issue #18 memory check). Every 1,000 requests it prints req/s, p50/p99 latency, the
errors (a valid request not answered 200, a bad one not answered 4xx) and the RSS of the
server's worker process(es) (found by the listening port, summed).
"""

from __future__ import annotations

import argparse
import io
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import requests
from PIL import Image


def jpeg(seed: int, size: int = 224) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size),
                                                                                  Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def worker_rss(port: int) -> int:
    """Summed RSS of the BentoML worker process(es) serving ``port``: the processes holding its
    listening socket (the arbiter and its workers), and their descendants, that run the worker."""
    listeners = {c.pid for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
    procs = {}
    for pid in listeners:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                procs[p.pid] = p
        except psutil.Error:
            continue
    total = 0
    for proc in procs.values():
        try:
            if "_bentoml_impl.worker.service" in " ".join(proc.cmdline()):
                total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--mix", choices=["mixed", "embed", "recognize"], default="mixed")
    parser.add_argument("--token", default=None, help="admin token: adds gallery add/remove pairs to the mix")
    parser.add_argument("--every", type=int, default=1000)
    args = parser.parse_args()
    url, port = args.url.rstrip("/"), int(args.url.rstrip("/").rsplit(":", 1)[1])
    images = [jpeg(i) for i in range(8)]
    auth = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    local = threading.local()
    lock = threading.Lock()
    window: list[float] = []
    state = {"errors": 0, "done": 0, "window_start": time.perf_counter(), "adds": 0}
    first_rss: list[int] = []

    def kinds():
        if args.mix != "mixed":
            return itertools.repeat(args.mix)
        cycle = ["recognize", "embed", "embed", "recognize", "bad-image", "embed", "wrong-field", "recognize",
                 "long-name", "embed"]
        if args.token:
            cycle += ["add-remove"]
        return itertools.cycle(cycle)

    def one(job: tuple[int, str]) -> None:
        i, kind = job
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        data = images[i % len(images)]
        start = time.perf_counter()
        try:
            if kind in ("recognize", "embed"):
                ok = session.post(f"{url}/{kind}", files={"image": (f"{i}.jpg", data)}, timeout=120).status_code == 200
            elif kind == "bad-image":
                ok = session.post(f"{url}/recognize", files={"image": ("x.jpg", b"not an image")},
                                  timeout=60).status_code == 400
            elif kind == "wrong-field":
                ok = session.post(f"{url}/embed", files={"file": ("x.jpg", data)}, timeout=60).status_code == 400
            elif kind == "long-name":
                ok = session.post(f"{url}/embed", files={"image": ("x." + "y" * 300, data)},
                                  timeout=60).status_code == 400
            else:
                label = f"soak {i}"
                resp = session.post(f"{url}/gallery/add", headers=auth, files={"images": (f"{i}.jpg", data)},
                                    data={"label": label}, timeout=120)
                ok = resp.status_code == 200 and session.post(f"{url}/gallery/remove", headers=auth,
                                                              json={"label": label}, timeout=120).status_code == 200
        except requests.RequestException:
            ok = False
            local.session = None
        elapsed = time.perf_counter() - start
        with lock:
            state["done"] += 1
            state["errors"] += not ok
            window.append(elapsed)
            if state["done"] % args.every == 0:
                now = time.perf_counter()
                rss = worker_rss(port)
                if not first_rss:
                    first_rss.append(rss)
                print(f"{state['done']:>7} requests  {len(window) / (now - state['window_start']):7.1f} req/s  "
                      f"p50 {percentile(window, 50) * 1000:7.1f} ms  p99 {percentile(window, 99) * 1000:7.1f} ms  "
                      f"errors {state['errors']:>4}  worker RSS {rss / 2**20:7.1f} MB", flush=True)
                window.clear()
                state["window_start"] = now

    print(f"soak: {args.requests} requests ({args.mix}) at {args.concurrency} clients against {url}; "
          f"worker RSS before {worker_rss(port) / 2**20:.1f} MB", flush=True)
    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(one, zip(range(args.requests), kinds())))
    last = worker_rss(port)
    ratio = last / first_rss[0] if first_rss else float("nan")
    print(f"done: {state['errors']} errors; worker RSS after the first {args.every}: "
          f"{first_rss[0] / 2**20 if first_rss else float('nan'):.1f} MB, at the end {last / 2**20:.1f} MB "
          f"({ratio:.3f}x)")


if __name__ == "__main__":
    main()
