"""Run under torchrun (W processes, gloo): sharded exact CSLS, sharded MNN, sharded faiss top-k.

Every rank computes on the same random embeddings and writes its results to OUT/rank<R>.safetensors;
the test compares them with one process. Arguments: OUT
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from snag_dist.engine.dist import Collectives
from snag_dist.eval.csls import alignment_ranks
from snag_dist.eval.filtered import KnownTriples
from snag_dist.eval.filtered_sharded import FileRows, full_filtered_ranks, sampled_filtered_ranks
from snag_dist.eval.neighbours import mutual_nearest_pairs
from snag_dist.eval.shards import shard_bounds
from snag_dist.eval.topk import IndexSpec, topk_alignment_ranks, topk_mutual_pairs


def case(n: int = 45, dim: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(n, dim, generator=gen)
    return src, src + 0.8 * torch.randn(n, dim, generator=gen)


def results(comm) -> dict[str, torch.Tensor]:
    src, tgt = case()
    n = len(src)
    emb = torch.cat([src, tgt])
    links = torch.stack([torch.arange(n), torch.arange(n, 2 * n)], 1)
    lo, hi = shard_bounds(n, comm)
    out = {}
    exact = alignment_ranks(emb, links, 3, chunk=4, comm=comm)
    out["exact.l2r"], out["exact.r2l"] = exact.l2r, exact.r2l
    out["mnn"] = mutual_nearest_pairs(emb, links[:, 0], links[:, 1], 3, chunk=4, comm=comm)
    # ivf: under 39 points per cell faiss gets one cell (exact search); this runs the ivf path sharded
    for name, spec, k in (("flat", IndexSpec("flat"), 7), ("ivf", IndexSpec("ivf", lists=2, probe=1), 7)):
        top = topk_alignment_ranks(src[lo:hi], tgt[lo:hi], 3, k, spec, comm, block=5)
        out[f"{name}.l2r"], out[f"{name}.r2l"] = top.l2r, top.r2l
        out[f"{name}.mnn"] = topk_mutual_pairs(src[lo:hi], tgt[lo:hi], links[lo:hi, 0], links[lo:hi, 1], 3, k,
                                               spec, comm, block=5)
    out.update(completion(comm))
    return out


def completion(comm) -> dict[str, torch.Tensor]:
    """Filtered ranks with the entity vectors split over the ranks (uneven blocks) and the queries too."""
    gen = torch.Generator().manual_seed(4)
    n, r = 61, 3
    vec, rel = torch.randn(n, 5, generator=gen), torch.randn(r, 5, generator=gen)
    triples = torch.stack([torch.randint(0, n, (200,), generator=gen), torch.randint(0, r, (200,), generator=gen),
                           torch.randint(0, n, (200,), generator=gen)], 1)
    known = KnownTriples(triples, n, r)

    def score(anchor, rel_c, predict_head, cand):
        return -torch.cdist(anchor * (-rel[rel_c] if predict_head else rel[rel_c]), cand, p=1).round()

    world, rank = (comm.world_size, comm.rank) if comm is not None else (1, 0)
    cut = [0, 20, 45, n][: world] + [n] if world > 1 else [0, n]  # uneven blocks of rows
    mine = vec[cut[rank]:cut[rank + 1]]
    lo, hi = shard_bounds(len(triples), comm)
    full = full_filtered_ranks(score, mine, triples[lo:hi], known, chunk=9, block=7, comm=comm)
    sampled = sampled_filtered_ranks(score, mine, triples[lo:hi], lo, known, 17, 5, comm)
    with tempfile.TemporaryDirectory() as tmp:  # the rank's vectors in a file (eval.spill_mib)
        spilled = FileRows.write(Path(tmp) / "v.f32", [mine[:4], mine[4:]], mine.shape[1], mine.device)
        s_full = full_filtered_ranks(score, spilled, triples[lo:hi], known, chunk=9, block=7, comm=comm)
        s_sampled = sampled_filtered_ranks(score, spilled, triples[lo:hi], lo, known, 17, 5, comm)
    return {"full.head": full.head, "full.tail": full.tail, "sampled.head": sampled.head,
            "sampled.tail": sampled.tail, "spilled.full.head": s_full.head, "spilled.full.tail": s_full.tail,
            "spilled.sampled.head": s_sampled.head, "spilled.sampled.tail": s_sampled.tail}


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    comm = Collectives.current()
    got = results(comm)
    save_file({k: v.contiguous() for k, v in got.items()}, str(out / f"rank{comm.rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
