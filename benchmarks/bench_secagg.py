"""Secure aggregation cost against the number of clients: SecAgg, SecAgg+ and plain summation.

For each client count ``n`` and each protocol, one full round runs in process
with real cryptography (X25519, HKDF, ChaCha20-Poly1305, ChaCha20 masks) via
``simulate_secure_sum``, with a fraction of clients dropping before masking
(so the server has to rebuild mask keys and strip pairwise masks). Reported
per client: client compute time (total client time / n, i.e. what one device
spends), bytes sent and received by a client that completes the round, and the server's compute time for the round.
Byte counts exclude the model broadcast, which is
the same with or without secure aggregation. "Plain" is the same vectors summed in float64 by the server with each client
uploading float32, the baseline the masking overhead is measured against.

Times are wall-clock on whatever machine runs this; on a shared machine they
are indicative. Complete-graph SecAgg is O(n^2) overall, so ``--max-complete``
skips it above a client count.

    PYTHONPATH=src python benchmarks/bench_secagg.py [--sizes 10,50,100,200,500] [--length 10000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fedloom.core.rng import numpy_rng
from fedloom.secagg import simulate_secure_sum


def _plain(xs: list[np.ndarray]) -> tuple[float, float]:
    t0 = time.perf_counter()
    uploads = [x.astype(np.float32) for x in xs]  # what each client would send
    np.sum(np.stack(uploads).astype(np.float64), axis=0)
    return time.perf_counter() - t0, float(uploads[0].nbytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,50,100,200,500", help="comma-separated client counts")
    ap.add_argument("--length", type=int, default=10_000, help="vector length (2NN: 199210)")
    ap.add_argument("--dropout", type=float, default=0.05, help="fraction dropping before masking")
    ap.add_argument("--max-complete", type=int, default=500, help="skip complete-graph SecAgg above this n")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    header = (
        f"{'n':>5} {'protocol':<9} {'deg':>4} {'t':>4} {'client s':>9} {'server s':>9} "
        f"{'KB up':>8} {'KB down':>8} {'x plain':>7} {'max err':>9}"
    )
    print(f"vector length {args.length}, {args.dropout:.0%} drop before masking, 32-bit ring")
    print(header)
    print("-" * len(header))
    for n in sizes:
        rng = numpy_rng(args.seed, "bench-secagg", client=n)
        xs = [rng.uniform(-1, 1, size=args.length) for _ in range(n)]
        dropped = set(range(int(args.dropout * n)))
        plain_s, plain_bytes = _plain(xs)
        print(
            f"{n:>5} {'plain':<9} {'-':>4} {'-':>4} {0.0:>9.4f} {plain_s:>9.4f} "
            f"{plain_bytes / 1e3:>8.1f} {0.0:>8.1f} {1.0:>7.2f} {0.0:>9.1e}"
        )
        for graph in ("complete", "harary"):
            if graph == "complete" and n > args.max_complete:
                print(f"{n:>5} {'secagg':<9} skipped (n > --max-complete {args.max_complete})")
                continue
            r = simulate_secure_sum(
                xs, clip=1.0, graph=graph, dropouts_before_masking=dropped, seed=args.seed, round=n
            )
            plain_sum = np.sum([xs[i] for i in r.included], axis=0)
            err = float(np.max(np.abs(r.total - plain_sum)))
            name = "secagg" if graph == "complete" else "secagg+"
            print(
                f"{n:>5} {name:<9} {r.graph.max_degree():>4} {r.threshold:>4} {r.client_seconds / n:>9.4f} "
                f"{r.server_seconds:>9.4f} {r.max_bytes_up / 1e3:>8.1f} "
                f"{r.max_bytes_down / 1e3:>8.1f} {r.max_bytes_up / plain_bytes:>7.2f} {err:>9.1e}"
            )


if __name__ == "__main__":
    main()
