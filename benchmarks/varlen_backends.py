"""CPU varlen backends: per-sequence fused SDPA vs one block-diagonal masked matmul.

Packs of N sequences of L tokens (8 heads x 64 dims, fp32); prints ms per call
(median of --repeats) for each backend and which one is faster. The registry's CPU
default is `sdpa` because it won on every pack measured.

    python -m benchmarks.varlen_backends [--repeats 20]
"""

from __future__ import annotations

import argparse

import torch

from attention.varlen import varlen_attention
from benchmarks.timing import median_seconds

PACKS = [(64, 16), (32, 64), (8, 256), (4, 1024), (1, 4096)]  # (sequences, tokens each)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"{'pack':>14} | {'sdpa ms':>8} | {'block_diag ms':>13} | faster")
    for n, length in PACKS:
        q, k, v = (torch.randn(n * length, 8, 64) for _ in range(3))
        cu = [i * length for i in range(n + 1)]
        t = {b: 1000 * median_seconds(lambda b=b: varlen_attention(q, k, v, cu, cu, backend=b), args.repeats)
             for b in ("sdpa", "block_diagonal")}
        print(f"{n:>4} x {length:>6} | {t['sdpa']:8.2f} | {t['block_diagonal']:13.2f} | {min(t, key=t.get)}")


if __name__ == "__main__":
    main()
