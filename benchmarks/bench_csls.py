"""How long does exact CSLS evaluation of the DBP15K test links take, both directions, chunked?

Question: 10,500 test links (70% of 15,000), d = 900 (3 modalities x 300), CSLS k = 3, on 2 CPU
cores: target <= 3 s. Compared side by side with a dense reference that holds the full L x L score
matrix (what the reference code does), and with the cost of one plain L x L matmul, the floor of
any exact method: the chunked one needs about 2 of them (hubness, then ranks) minus the block it
keeps between passes. Timings are medians of --repeats runs on random data; the ranks of both
methods are compared (float32 near-ties may differ by 1 in a handful of queries).

    .venv/bin/python benchmarks/bench_csls.py                 # the question above
    .venv/bin/python benchmarks/bench_csls.py --links 3000 --chunks 512 1024
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from snag_dist.eval.csls import alignment_ranks
from snag_dist.eval.metrics import AlignmentRanks
from snag_dist.seeding import torch_generator


def dense_reference(emb: torch.Tensor, links: torch.Tensor, k: int) -> AlignmentRanks:
    """The whole L x L CSLS matrix at once (memory O(L^2)); same tie rule as the chunked code."""
    src, tgt = F.normalize(emb[links[:, 0]].float(), dim=1), F.normalize(emb[links[:, 1]].float(), dim=1)
    cos = src @ tgt.T
    r_tgt, r_src = cos.topk(k, dim=1).values.mean(1), cos.topk(k, dim=0).values.mean(0)
    csls = 2 * cos - r_tgt.unsqueeze(1) - r_src.unsqueeze(0)
    gold = csls.diagonal()
    l2r = 1.0 + (csls > gold.unsqueeze(1)).sum(1).double()
    r2l = 1.0 + (csls > gold.unsqueeze(0)).sum(0).double()
    return AlignmentRanks(l2r, r2l)


def agreement(got: AlignmentRanks, ref: AlignmentRanks) -> str:
    """Float32 rounding can flip a candidate within ~1e-7 of the gold score, in either method."""
    delta = torch.cat([got.l2r - ref.l2r, got.r2l - ref.r2l])
    if not delta.any():
        return "equal"
    return f"{int(delta.ne(0).sum())} of {delta.numel()} differ, max |d| {delta.abs().max():.0f}"


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--links", type=int, default=10_500)
    ap.add_argument("--dim", type=int, default=900)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--chunks", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch_generator(0)
    emb = torch.randn(2 * args.links, args.dim, generator=gen)
    links = torch.stack([torch.arange(args.links), args.links + torch.arange(args.links)], dim=1)
    n, mib = args.links, 4 / 2**20

    a, b = emb[:n].contiguous(), emb[n:].contiguous()
    t_mm, _ = median_time(lambda: a @ b.T, args.repeats)
    t_dense, ref = median_time(lambda: dense_reference(emb, links, args.k), args.repeats)
    print(f"L={n} d={args.dim} k={args.k} threads={torch.get_num_threads()} median of {args.repeats}")
    print(f"{'method':<22}{'chunk':>7}{'seconds':>10}{'x matmul':>10}{'score MiB':>11}  ranks")
    print(f"{'one L x L matmul':<22}{'-':>7}{t_mm:>10.2f}{1.0:>10.2f}{n * n * mib:>11.0f}")
    dense_mib = 3 * n * n * mib  # cos, csls and a comparison at least
    print(f"{'dense reference':<22}{'-':>7}{t_dense:>10.2f}{t_dense / t_mm:>10.2f}{dense_mib:>11.0f}  (ref)")
    for chunk in args.chunks:
        t, got = median_time(lambda c=chunk: alignment_ranks(emb, links, args.k, c), args.repeats)
        buffers = 2.25 * min(chunk, n) * n * mib  # two chunk x L float blocks + a bool mask
        print(f"{'chunked (2 pass)':<22}{chunk:>7}{t:>10.2f}{t / t_mm:>10.2f}{buffers:>11.0f}  "
              f"{agreement(got, ref)}")


if __name__ == "__main__":
    main()
