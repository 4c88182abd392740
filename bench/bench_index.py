"""Gallery index benchmark: build time, search QPS and recall@1 vs exact (FLAT) search.

For each gallery size, builds HNSW32 / IVF / FLAT galleries through ``visrec.index.Gallery``
(threads set explicitly), times a batch of top-k queries and compares each top-1 with FLAT's.

    .venv/bin/python bench/bench_index.py                                  # 10k and 100k, clustered
    .venv/bin/python bench/bench_index.py --sizes 10000 --data random
    .venv/bin/python bench/bench_index.py --ef-search 64 128 256 --nprobe 8 16 32   # sweep
    .venv/bin/python bench/bench_index.py --features feats.npy             # real features

Data: ``random`` (i.i.d. Gaussian directions -- the hardest case for graph/IVF indexes: all
neighbours are almost equally far) or ``clustered`` (``--clusters`` Gaussian clusters,
closer to real embeddings where same-class vectors sit together). Queries are fresh
draws from the same distribution (or held-out rows of ``--features``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

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


def timed(fn: Callable[[], object], min_seconds: float = 1.0, min_runs: int = 3) -> float:
    """Best wall time of ``fn`` over at least ``min_runs`` runs / ``min_seconds`` (after a warm-up)."""
    fn()
    best, spent, runs = float("inf"), 0.0, 0
    while runs < min_runs or spent < min_seconds:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    if args.features:
        feats = normalise(np.load(args.features).astype(np.float32))
        queries_all, pool = feats[-args.queries:], feats[:-args.queries]
        args.dim = feats.shape[1]
        sizes = sorted({min(s, len(pool)) for s in args.sizes})
        source = f"features {args.features}"
    else:
        sizes = args.sizes
        source = args.data
        if args.data == "clustered":
            source += f" ({args.clusters} clusters, spread {args.spread})"
    print(f"data: {source}, dim {args.dim}, {args.queries} queries, top-{args.top_k}, {args.threads} threads\n")
    header = "| n | index | params | build s | QPS | QPS / FLAT | recall@1 vs FLAT |"
    print(header)
    print("|---:|---|---|---:|---:|---:|---:|")

    for n in sizes:
        if args.features:
            gallery_x, queries = pool[:n], queries_all
        else:
            gallery_x, queries = make_data(args.data, n, args.queries, args.dim, args.clusters, args.spread, rng)
        labels = [f"item{i}" for i in range(n)]
        order = ["FLAT"] + [t for t in args.types if t.upper() != "FLAT"]  # FLAT first: it is the reference
        exact_ids = exact_scores = flat_qps = None
        for index_type in order:
            params = {}
            if index_type.upper().startswith("HNSW"):
                if args.ef_construction:
                    params["ef_construction"] = args.ef_construction
                if args.hnsw_m:
                    params["hnsw_m"] = args.hnsw_m
            start = time.perf_counter()
            gallery = Gallery.build(gallery_x, labels, index_type=index_type, num_threads=args.threads, **params)
            build = time.perf_counter() - start
            sweep = ([("ef_search", v) for v in args.ef_search] if index_type.upper().startswith("HNSW")
                     else [("nprobe", v) for v in args.nprobe] if index_type.upper() == "IVF" else [(None, None)])
            for name, value in sweep:
                if name and value is not None:
                    gallery.tune(**{name: value})
                seconds = timed(lambda: gallery.search_arrays(queries, args.top_k))
                scores, ids = gallery.search_arrays(queries, args.top_k)
                qps = len(queries) / seconds
                if exact_ids is None:
                    exact_ids, exact_scores, flat_qps = ids[:, 0], scores[:, 0], qps
                # a different id with the same score (a tie) still counts as correct
                hit = (ids[:, 0] == exact_ids) | (scores[:, 0] >= exact_scores - 1e-6)
                shown = {k: v for k, v in gallery.index_params.items() if k != "compact_fraction"}
                print(f"| {n} | {gallery.index_type} | {', '.join(f'{k}={v}' for k, v in shown.items()) or '-'} "
                      f"| {build:.2f} | {qps:,.0f} | {qps / flat_qps:.1f}x | {hit.mean():.3f} |", flush=True)
            del gallery


if __name__ == "__main__":
    main()
