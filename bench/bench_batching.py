"""Adaptive batching on vs off: starts `bentoml serve` twice and load-tests /embed on each.

    .venv/bin/python bench/bench_batching.py                          # the models `make repro` made
    .venv/bin/python bench/bench_batching.py -o recognition.extractor=/tmp/lite0_export --requests 200
    .venv/bin/python bench/bench_batching.py --endpoint recognize --batching on --requests 2000 --concurrency 16

Each server runs on 127.0.0.1 at a free port with VISREC_ADAPTIVE_BATCHING=1 or 0 (everything
else from the params file and -o overrides), gets a warm-up, then N requests at each
concurrency level from bench_service.run_level. Prints both tables, the throughput ratio
(on / off) per level, and the mean images per extractor call (from the service's
visrec_embed_batch_size histogram). Client and server share the machine's CPU.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import run_level, synthetic_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(params: Path, batching: bool, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "VISREC_PARAMS": str(params), "VISREC_ADAPTIVE_BATCHING": "1" if batching else "0"}
    handle = log.open("wb")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("bentoml")), "serve",
                             "bento.service:VisrecRecognition", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bentoml serve exited ({proc.returncode}); see {log}")
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"server not ready after 120 s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def mean_batch(url: str) -> float | None:
    values = {}
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(("visrec_embed_batch_size_sum", "visrec_embed_batch_size_count")):
            values[line.split("{")[0].split(" ")[0]] = float(line.rsplit(" ", 1)[1])
    count = values.get("visrec_embed_batch_size_count")
    return values["visrec_embed_batch_size_sum"] / count if count else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("-o", "--override", action="append", default=[], help="dotted KEY=VALUE for the server")
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--endpoint", choices=["embed", "recognize"], default="embed")
    parser.add_argument("--batching", choices=["both", "on", "off"], default="both")
    args = parser.parse_args()

    from visrec.config import load_config

    cfg = load_config(args.params, args.override)
    work = Path(tempfile.mkdtemp(prefix="visrec-batching-"))
    params = work / "params.yaml"
    raw = cfg.to_dict()
    base = args.params.resolve().parent
    rec = raw["recognition"]
    for key in ("extractor", "detector", "gallery"):  # absolute: the server reads them from elsewhere
        if rec.get(key):
            rec[key] = str((base / rec[key]).resolve())
    raw["serve"]["champion"] = False  # measure exactly the models named above
    images = synthetic_images()
    if not Path(rec["gallery"]).exists():  # /embed needs none, but the service loads one: a small one
        from visrec.inference.extractor_runtime import Extractor
        from visrec.inference.gallery_ops import GalleryItem, build_gallery

        paths = []
        for i, data in enumerate(images):
            paths.append(work / f"gallery_{i}.jpg")
            paths[-1].write_bytes(data)
        build_gallery(Extractor(rec["extractor"]), [GalleryItem(p, f"item {i}") for i, p in enumerate(paths)],
                      "FLAT", progress=False).save(work / "gallery")
        rec["gallery"] = str(work / "gallery")
    params.write_text(yaml.safe_dump(raw))
    results = {}
    modes = {"both": (True, False), "on": (True,), "off": (False,)}[args.batching]
    for batching in modes:
        proc, url = start_server(params, batching, work / f"server_{int(batching)}.log")
        try:
            run_level(url, args.endpoint, images, 4, 40, 120)  # warm-up (and the dispatcher's calibration)
            rows = [run_level(url, args.endpoint, images, c, args.requests, 120) for c in args.concurrency]
            results[batching] = (rows, mean_batch(url) if batching else None)
        finally:
            stop(proc)
    print(f"POST /{args.endpoint}, extractor {rec['extractor']}, {args.requests} requests per level, 2 CPU cores shared "
          "by client and server")
    print(f"{'batching':>9} {'conc':>5} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for batching, (rows, _) in results.items():
        for r in rows:
            print(f"{'on' if batching else 'off':>9} {r['concurrency']:>5} {r['errors']:>6} {r['rps']:>8.1f} "
                  f"{r['p50']:>8.1f} {r['p95']:>8.1f} {r['p99']:>8.1f}")
            if r["first_error"]:
                print(f"          first error: {r['first_error']}")
    if len(results) == 2:
        for on, off in zip(results[True][0], results[False][0], strict=True):
            print(f"concurrency {on['concurrency']}: batching on / off = {on['rps'] / off['rps']:.2f}x")
    if True in results:
        print(f"mean images per extractor call of /embed with batching: {results[True][1]}")


if __name__ == "__main__":
    main()
