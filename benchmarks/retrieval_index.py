"""benchmarks/retrieval_index.py

Flat vs IVF corpus index: build time, query time and IVF top-1 agreement with the exact (flat) search, on
clustered synthetic unit vectors shaped like CLIP ViT-L-14 text embeddings (768-d). Real caption embeddings
are clustered too, which is what IVF relies on; uniformly random vectors would be its worst case.

    .venv/bin/python benchmarks/retrieval_index.py --corpus 200000 --queries 2000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tga.retrieval.index import build_index, default_nlist, set_nprobe


def clustered_unit_vectors(count: int, dim: int, clusters: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, count)] + 0.6 * rng.standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--nprobe", type=int, nargs="*", default=[1, 8, 32])
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    corpus = clustered_unit_vectors(args.corpus, args.dim, 1000, rng)
    queries = clustered_unit_vectors(args.queries, args.dim, 1000, rng)

    start = time.perf_counter()
    flat = build_index(corpus, "flat")
    build_flat = time.perf_counter() - start
    start = time.perf_counter()
    _, exact = flat.search(queries, 1)
    query_flat = time.perf_counter() - start
    print(f"corpus {args.corpus} x {args.dim}, {args.queries} queries")
    print(f"flat: build {build_flat:.2f}s, search {1000 * query_flat / args.queries:.3f} ms/query")

    start = time.perf_counter()
    ivf = build_index(corpus, "ivf")
    build_ivf = time.perf_counter() - start
    print(f"ivf (nlist {default_nlist(args.corpus)}): build+train {build_ivf:.2f}s")
    for nprobe in args.nprobe:
        set_nprobe(ivf, nprobe)
        start = time.perf_counter()
        _, found = ivf.search(queries, 1)
        elapsed = time.perf_counter() - start
        agreement = float(np.mean(found[:, 0] == exact[:, 0]))
        print(
            f"  nprobe {nprobe:3d}: search {1000 * elapsed / args.queries:.3f} ms/query, top-1 = flat {agreement:.3f}"
        )


if __name__ == "__main__":
    main()
