"""What label centroids (``recognition.centroid_weight``) cost a gallery: the first search that
meets its labels after a change computes them, later ones reuse them.

For each backend and size: a gallery of ``n`` vectors under ``n / --per-label`` labels, then
``--searches`` batches of 3 queries (a photo's boxes), each scored on the labels of its 50
nearest entries, as the recognition system does. Prints the first batch's centroid time (Faiss:
one pass over every vector; Milvus: a query for the labels met) and the mean of the following
ones (cached, or a query for labels not met before), beside the search itself.

    .venv/bin/python bench/bench_centroids.py --backend faiss milvus --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import numpy as np

from bench_index import build, make_data, make_parser, milvus_server
from visrec.index.faiss_index import EXACT_BELOW


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="+", choices=["faiss", "milvus"], default=["faiss"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--per-label", type=int, default=10, help="gallery vectors per label")
    parser.add_argument("--searches", type=int, default=50)
    parser.add_argument("--milvus-uri", default=None)
    args = parser.parse_args()
    # what bench_index.build reads: its defaults (the pipeline's HNSW settings), adds of 10,000,
    # exhaustive search below the pipeline's exact_below as served
    build_args = make_parser().parse_args(["--add-chunk", "10000", "--exact-below", str(EXACT_BELOW)])
    rng = np.random.default_rng(0)
    print("| n | labels | backend | search ms / photo | centroids, first photo ms | centroids, next photos ms |")
    print("|---:|---:|---|---:|---:|---:|")
    with milvus_server(args.milvus_uri, 2) if "milvus" in args.backend else nullcontext() as uri:
        settings = None
        if uri:
            from visrec.index.milvus_store import MilvusSettings

            settings = MilvusSettings(uri=uri, alias_prefix="benchc", consistency_level="Bounded")
        for n in args.sizes:
            x, queries = make_data("clustered", n, 3 * (args.searches + 1), args.dim, n // args.per_label, 1.0, rng)
            labels = [f"label {i // args.per_label}" for i in range(n)]
            for backend in args.backend:
                gallery = build(backend, "HNSW32", x, build_args, settings, labels)[0]
                table = gallery.label_centroids()
                search_s, centroid_s = [], []
                for batch in queries.reshape(-1, 3, args.dim):
                    start = time.perf_counter()
                    rows = gallery.search(batch, 50)
                    search_s.append(time.perf_counter() - start)
                    met = list(dict.fromkeys(h.label for row in rows for h in row))
                    start = time.perf_counter()
                    table.similarities(batch, met)
                    centroid_s.append(time.perf_counter() - start)
                print(f"| {n:,} | {n // args.per_label:,} | {backend} | {1000 * np.mean(search_s):.2f} | "
                      f"{1000 * centroid_s[0]:.1f} | {1000 * np.mean(centroid_s[1:]):.2f} |", flush=True)
                gallery.release()


if __name__ == "__main__":
    main()
