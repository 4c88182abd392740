"""Gallery index benchmark: build time, insert rate, search QPS (1 and N concurrent clients) and
recall@1 against exact search, for the Faiss and Milvus backends side by side.

    .venv/bin/python bench/bench_index.py                                  # Faiss: 10k and 100k, clustered
    .venv/bin/python bench/bench_index.py --backend faiss milvus --sizes 100000 1000000 --types HNSW32
    .venv/bin/python bench/bench_index.py --sizes 10000 --data random
    .venv/bin/python bench/bench_index.py --ef-search 64 128 256 --nprobe 8 16 32   # sweep (Faiss)
    .venv/bin/python bench/bench_index.py --features feats.npy             # real features

Each backend builds its gallery through the library (``visrec.index``), the way the pipeline
does: Faiss in this process (threads set explicitly), Milvus through pymilvus, inserted in
batches of ``--insert-batch``. Milvus is a Milvus Lite server this script starts on 127.0.0.1
over a temporary data dir (``OMP_NUM_THREADS=--threads``), or the server ``--milvus-uri`` names.

Columns: ``build s`` until the gallery is searchable with its index (Milvus: after a flush);
``insert/s`` vectors per second of the adds alone; ``QPS 1`` one client sending one query per
request (the service's pattern); ``QPS N`` ``--clients`` such clients at once (each over
``--timed-queries`` queries or ``--qps-seconds``, whichever ends first); ``recall@1`` the
share of queries whose top-1 is the exact top-1 (exact: a Faiss flat inner-product search;
a tie in score counts as a hit). Data: ``random`` (i.i.d. directions, the hardest case for
graph/IVF indexes) or ``clustered`` (``--clusters`` Gaussian clusters, closer to real
embeddings); queries are fresh draws from the same distribution (or held-out ``--features`` rows).
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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from visrec.index import Gallery


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(kind: str, n: int, queries: int, dim: int, clusters: int, spread: float,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Gallery vectors and queries; clustered points are ``centre + spread * noise`` (unit-norm scale)."""
    total = n + queries
    if kind == "random":
        x = rng.standard_normal((total, dim), dtype=np.float32)
    else:
        centres = normalise(rng.standard_normal((clusters, dim), dtype=np.float32))
        x = centres[rng.integers(0, clusters, total)]
        x += spread * rng.standard_normal((total, dim), dtype=np.float32) / np.sqrt(dim)
    x = normalise(x)
    return x[:n], x[n:]


def exact_top1(gallery_x: np.ndarray, queries: np.ndarray, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact nearest neighbour of each query (inner product), as (ids, scores)."""
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(gallery_x.shape[1])
    index.add(gallery_x)
    scores, ids = index.search(queries, 1)
    return ids[:, 0], scores[:, 0]


def qps(search: Callable[[np.ndarray], object], queries: np.ndarray, clients: int, budget_s: float) -> float:
    """Queries per second with ``clients`` threads each sending one query per call, over the
    queries or until ``budget_s`` has passed (a slow engine is measured on fewer of them)."""
    search(queries[:1])  # warm-up
    start = time.perf_counter()

    def one(q: np.ndarray) -> int:
        if time.perf_counter() - start > budget_s:
            return 0
        search(q[None])
        return 1

    if clients == 1:
        done = sum(one(q) for q in queries)
    else:
        with ThreadPoolExecutor(clients) as pool:
            done = sum(pool.map(one, queries))
    return done / (time.perf_counter() - start)


@contextmanager
def milvus_server(uri: str | None, threads: int) -> Iterator[str]:
    """The Milvus to use: ``uri`` as given, else a Milvus Lite server on 127.0.0.1 for this run."""
    if uri:
        yield uri
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench-milvus-") as data_dir:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        server = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", f"{data_dir}/db",
                                   "--host", "127.0.0.1", "--port", str(port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("Milvus Lite did not start") from None
                    time.sleep(0.2)
            yield f"http://127.0.0.1:{port}"
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


def build(backend: str, index_type: str, x: np.ndarray, args, settings,
          labels: Sequence[str] | str = "item") -> tuple[object, float, float]:
    """The gallery, its build seconds (until searchable with its index) and its adds' vectors/s.
    ``labels``: one per vector, or one for all (this benchmark is about vectors)."""
    start = time.perf_counter()
    if backend == "faiss":
        gallery = Gallery.create(x.shape[1], index_type, num_threads=args.threads, **hnsw_params(index_type, args))
    else:
        from visrec.index.milvus_gallery import MilvusGallery

        gallery = MilvusGallery.create(x.shape[1], index_type, settings=settings, **hnsw_params(index_type, args))
    add_start = time.perf_counter()
    for chunk in range(0, len(x), args.add_chunk):  # streamed, as a big catalogue is built
        gallery.add(x[chunk:chunk + args.add_chunk],
                    labels if isinstance(labels, str) else labels[chunk:chunk + args.add_chunk])
    added = time.perf_counter() - add_start
    if backend == "milvus":
        gallery.flush()
    return gallery, time.perf_counter() - start, len(x) / added


def rate(value: float) -> str:
    """A QPS figure: whole numbers, but one decimal below 10 (Milvus Lite at 1M answers < 1/s)."""
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def hnsw_params(index_type: str, args) -> dict:
    params = {}
    if index_type.upper() in ("HNSW32", "IVF"):
        params["exact_below"] = args.exact_below
    if index_type.upper().startswith("HNSW"):
        if args.ef_construction:
            params["ef_construction"] = args.ef_construction
        if args.hnsw_m:
            params["hnsw_m"] = args.hnsw_m
    return params


def make_parser() -> argparse.ArgumentParser:
    """This benchmark's options; ``make_parser().parse_args([...])`` also gives other benchmarks
    the settings :func:`build` reads."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="+", choices=["faiss", "milvus"], default=["faiss"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000, help="queries for recall@1 (one batch search)")
    parser.add_argument("--timed-queries", type=int, default=400, help="queries sent one by one for QPS")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--qps-seconds", type=float, default=60.0, help="time budget of each QPS measurement")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", choices=["clustered", "random"], default="clustered")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--spread", type=float, default=1.0, help="clustered: noise norm relative to centre")
    parser.add_argument("--features", help="a (n, dim) .npy of real features; last --queries rows are queries")
    parser.add_argument("--types", nargs="+", default=["HNSW32", "IVF", "FLAT"])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[None], help="HNSW efSearch values to sweep")
    parser.add_argument("--ef-construction", type=int, default=None)
    parser.add_argument("--hnsw-m", type=int, default=None)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[None], help="IVF nprobe values to sweep")
    parser.add_argument("--exact-below", type=int, default=0,
                        help="HNSW/IVF galleries smaller than this are searched exhaustively (the pipeline's "
                             "index.exact_below, 5000; 0 here so that the index types themselves are measured)")
    parser.add_argument("--add-chunk", type=int, default=50_000, help="vectors per gallery.add call")
    parser.add_argument("--insert-batch", type=int, default=5_000, help="Milvus: rows per insert call")
    parser.add_argument("--milvus-uri", help="an existing Milvus server (default: a Milvus Lite server for this run)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main() -> None:
    args = make_parser().parse_args()
    rng = np.random.default_rng(args.seed)

    if args.features:
        feats = normalise(np.load(args.features).astype(np.float32))
        queries_all, pool = feats[-args.queries:], feats[:-args.queries]
        args.dim = feats.shape[1]
        sizes = sorted({min(s, len(pool)) for s in args.sizes})
        source = f"features {args.features}"
    else:
        sizes, source = args.sizes, args.data
        if args.data == "clustered":
            source += f" ({args.clusters} clusters, spread {args.spread})"
    print(f"data: {source}, dim {args.dim}, {args.queries} recall queries, {args.timed_queries} timed queries, "
          f"top-{args.top_k}, {args.threads} threads, backends {' '.join(args.backend)}\n")
    print(f"| n | backend | index | params | build s | insert/s | QPS 1 | QPS {args.clients} | recall@1 |")
    print("|---:|---|---|---|---:|---:|---:|---:|---:|")

    with milvus_server(args.milvus_uri if "milvus" in args.backend else "unused", args.threads) as uri:
        from visrec.index.milvus_store import MilvusSettings

        settings = (MilvusSettings(uri=uri, alias_prefix="bench", consistency_level="Bounded",
                                   insert_batch=args.insert_batch) if "milvus" in args.backend else None)
        for n in sizes:
            if args.features:
                gallery_x, queries = pool[:n], queries_all
            else:
                gallery_x, queries = make_data(args.data, n, args.queries, args.dim, args.clusters, args.spread, rng)
            exact_ids, exact_scores = exact_top1(gallery_x, queries, args.threads)
            timed = queries[: args.timed_queries]
            for index_type in args.types:
                for backend in args.backend:
                    gallery, build_s, insert_rate = build(backend, index_type, gallery_x, args, settings)
                    sweep = ([("ef_search", v) for v in args.ef_search] if index_type.upper().startswith("HNSW")
                             else [("nprobe", v) for v in args.nprobe] if index_type.upper() == "IVF"
                             else [(None, None)])
                    for name, value in sweep:
                        if name and value is not None:
                            gallery.tune(**{name: value})
                        scores, ids = gallery.search_arrays(queries, args.top_k)
                        hit = (ids[:, 0] == exact_ids) | (scores[:, 0] >= exact_scores - 1e-5)
                        search = lambda q: gallery.search_arrays(q, args.top_k)  # noqa: E731
                        one = qps(search, timed, 1, args.qps_seconds)
                        many = qps(search, timed, args.clients, args.qps_seconds)
                        shown = {k: v for k, v in gallery.index_params.items()
                                 if k not in ("compact_fraction", "exact_below") or (k == "exact_below" and v)}
                        print(f"| {n:,} | {backend} | {gallery.index_type} | "
                              f"{', '.join(f'{k}={v}' for k, v in shown.items()) or '-'} | {build_s:.1f} | "
                              f"{insert_rate:,.0f} | {rate(one)} | {rate(many)} | {hit.mean():.3f} |", flush=True)
                    try:
                        gallery.release()
                    except Exception as exc:  # noqa: BLE001 - Milvus Lite 3.2 failed dropping a 1M collection
                        print(f"(could not drop the benchmark collection: {exc})", flush=True)
                    del gallery


if __name__ == "__main__":
    main()
