"""Filtered ranking when the entity vectors are split over ranks (KG completion at millions of entities).

`eval.filtered` scores each query against one (N, 2D) table that every process holds: at 1M entities
and width 256 that is 1 GiB per process before any score is computed. Here rank r holds only its
contiguous block of entity vectors (`mine`, rows [start_r, start_r + n_r)) and ranks its block of
the queries (`shards.shard_bounds`):

  full filtered ("full"): the candidate blocks go round: in round i every rank contributes its rows
  [i B, (i + 1) B), all ranks gather them (W x B rows) and score their queries against them, adding
  up per query how many unfiltered candidates score above / equal to the gold. Every query meets
  every entity once, so the ranks equal `eval.filtered` (same tie rules). Memory per rank: its block
  + one gathered candidate block + one (chunk, W x B) score block: flat in N apart from the N/W rows
  the rank owns anyway.

  sampled ("sampled-K"): each group of 64 consecutive queries (by global query index) is ranked
  against K entities drawn uniformly for that group by a counter-based hash of (seed, group, j), so
  the draw is the same for any number of ranks. Known true answers and the gold among them are
  filtered out. Its MRR is NOT comparable to full filtered MRR (ranks among K, not N); metrics carry
  the protocol in their names.

The anchor and gold vectors of a rank's queries come from their owners through two all-to-all
exchanges (`fetch_rows`). ``comm`` is injected (``tasks.base.Comm``); nothing here imports a
distributed API. Legend: Q queries of this rank, c queries in a chunk, R candidates in a round.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from snag_dist.eval.filtered import DIRECTIONS, DirectionRanks, KnownTriples
from snag_dist.eval.metrics import Ties

BlockScore = Callable[[Tensor, Tensor, bool, Tensor], Tensor]
"""block_score(anchor_c2D, relation_c, predict_head, candidates_R2D) -> (c, R) scores (higher is better)."""

SAMPLE_GROUP = 64  # queries sharing one candidate draw in the sampled protocol


class Exchange(Protocol):
    rank: int
    world_size: int

    def sizes(self, n: int, device: torch.device) -> list[int]: ...

    def gather_rows(self, x: Tensor, sizes: list[int] | None = None) -> Tensor: ...

    def all_to_all(self, x: Tensor, send_counts: list[int]) -> tuple[Tensor, list[int]]: ...


class _Alone:
    rank, world_size = 0, 1

    def sizes(self, n: int, device: torch.device) -> list[int]:
        return [n]

    def gather_rows(self, x: Tensor, sizes: list[int] | None = None) -> Tensor:
        return x

    def all_to_all(self, x: Tensor, send_counts: list[int]) -> tuple[Tensor, list[int]]:
        return x, list(send_counts)


class FileRows:
    """This rank's (n, d) float32 entity vectors kept in a file instead of memory (``eval.spill_mib``).

    Every candidate round reads its block with a plain read (no mapping whose touched pages would
    stay in the resident set), anchors and golds are read by id, so the rank's resident memory stays
    flat in N: only the round's block is ever held. Written once per evaluation by `write`.
    """

    def __init__(self, path: Path, n: int, d: int, device: torch.device) -> None:
        self.path, self.n, self.d, self.device = Path(path), n, d, device

    @classmethod
    def write(cls, path: Path, blocks, d: int, device: torch.device) -> FileRows:
        """Rows from an iterator of (b, d) blocks, appended in order."""
        n = 0
        with open(path, "wb") as fh:
            for block in blocks:
                block.detach().float().cpu().numpy().tofile(fh)
                n += len(block)
        return cls(path, n, d, device)

    def __len__(self) -> int:
        return self.n

    def rows(self, a: int, b: int) -> Tensor:
        a, b = max(0, a), min(b, self.n)
        count = max(0, b - a) * self.d
        block = np.fromfile(self.path, dtype=np.float32, count=count, offset=a * self.d * 4)
        return torch.from_numpy(block).view(-1, self.d).to(self.device)

    def take(self, ids: Tensor) -> Tensor:
        mapped = np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.n, self.d))
        out = np.array(mapped[ids.cpu().numpy()])  # a copy: the map is dropped right away
        del mapped
        return torch.from_numpy(out).view(-1, self.d).to(self.device)


Rows = Tensor | FileRows


def _slice(mine: Rows, a: int, b: int) -> Tensor:
    return mine.rows(a, b) if isinstance(mine, FileRows) else mine[a:b]


def _take(mine: Rows, ids: Tensor) -> Tensor:
    return mine.take(ids) if isinstance(mine, FileRows) else mine[ids.to(mine.device)]


def _starts(sizes: list[int]) -> Tensor:
    return torch.tensor([0, *sizes]).cumsum(0)


def fetch_rows(mine: Rows, ids: Tensor, comm: Exchange, starts: Tensor) -> Tensor:
    """Rows ``ids`` (global) of a table whose rank r holds rows [starts[r], starts[r + 1]).
    Every rank must call it (possibly with no ids)."""
    ids = ids.long().cpu()
    if comm.world_size == 1:
        return _take(mine, ids)
    owner = torch.searchsorted(starts[1:], ids.contiguous(), right=True)
    order = owner.argsort(stable=True)
    counts = torch.bincount(owner, minlength=comm.world_size).tolist()
    asked, asked_counts = comm.all_to_all(ids[order], counts)
    rows = _take(mine, asked - starts[comm.rank])
    back, _ = comm.all_to_all(rows, asked_counts)
    out = torch.empty_like(back)
    out[order.to(back.device)] = back
    return out


def _ranks(greater: Tensor, equal: Tensor, ties: Ties) -> Tensor:
    if ties == "optimistic":
        return 1.0 + greater
    if ties == "pessimistic":
        return 1.0 + greater + equal
    return 1.0 + greater + 0.5 * equal


def _spans(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, stop)) for a in range(start, stop, step)]


def _columns(triples: Tensor, predict_head: bool) -> tuple[Tensor, Tensor, Tensor]:
    anchor_col, target_col = (2, 0) if predict_head else (0, 2)
    return triples[:, anchor_col], triples[:, 1], triples[:, target_col]


def _direction(block_score: BlockScore, mine: Rows, triples: Tensor, predict_head: bool, comm: Exchange,
               starts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(anchor ids, relations, target ids, anchor vectors, gold scores) of the queries of one direction."""
    anchor_id, rel, target = _columns(triples, predict_head)
    anchor, gold_vec = fetch_rows(mine, anchor_id, comm, starts), fetch_rows(mine, target, comm, starts)
    return anchor_id, rel, target, anchor, _gold_scores(block_score, anchor, rel, gold_vec, predict_head, 256)


def _gold_scores(block_score: BlockScore, anchor: Tensor, rel: Tensor, target: Tensor, predict_head: bool,
                 chunk: int) -> Tensor:
    """Score of each query's own gold, by the same block function as the candidates."""
    out = []
    for a, b in _spans(0, len(anchor), chunk):
        out.append(block_score(anchor[a:b], rel[a:b], predict_head, target[a:b]).diagonal().float().cpu())
    gold = torch.cat(out) if out else torch.zeros(0)
    if torch.isnan(gold).any():
        raise ValueError("score function returned NaN for a target entity")
    return gold


class _Round:
    """Where global entity ids sit among one round's gathered candidates (rank r's rows
    [starts[r] + skip, starts[r] + skip + lens[r]), concatenated in rank order)."""

    def __init__(self, starts: Tensor, skip: int, lens: list[int]) -> None:
        self.starts, self.first = starts, starts[:-1] + skip
        self.lens, self.offsets = torch.tensor(lens), _starts(lens)

    def position(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Column of each id in the round's candidates, and whether it is there at all."""
        owner = torch.searchsorted(self.starts[1:], ids.contiguous(), right=True).clamp_max(len(self.lens) - 1)
        off = ids - self.first[owner]
        inside = (off >= 0) & (off < self.lens[owner])
        return self.offsets[owner] + off, inside


def full_filtered_ranks(block_score: BlockScore, mine: Rows, triples_Q3: Tensor, known: KnownTriples,
                        chunk: int, block: int, comm: Exchange | None = None,
                        ties: Ties = "realistic") -> DirectionRanks:
    """Filtered ranks of this rank's queries among all N entities, candidates in rounds of W x block rows."""
    comm = comm or _Alone()
    sizes = comm.sizes(len(mine), torch.device("cpu"))
    starts = _starts(sizes)
    if int(starts[-1]) != known.num_entities:
        raise ValueError(f"ranks hold {int(starts[-1])} entity rows, the filter knows {known.num_entities}")
    rounds = -(-max(sizes) // block)
    triples = triples_Q3.long().cpu()
    out: dict[str, Tensor] = {}
    for direction in DIRECTIONS:
        predict_head = direction == "head"
        anchor_id, rel, target, anchor, gold = _direction(block_score, mine, triples, predict_head, comm, starts)
        rows_k, cols_k = known.answers(anchor_id, rel, predict_head)  # rows ascending
        greater = torch.zeros(len(triples), dtype=torch.float64)
        equal = torch.zeros(len(triples), dtype=torch.float64)
        for i in range(rounds):
            lens = [max(0, min(block, s - i * block)) for s in sizes]
            cand = comm.gather_rows(_slice(mine, i * block, i * block + lens[comm.rank]), lens)
            where = _Round(starts, i * block, lens)
            for a, b in _spans(0, len(triples), chunk):
                s = block_score(anchor[a:b], rel[a:b], predict_head, cand)  # (c, R)
                k0, k1 = (int(v) for v in torch.searchsorted(rows_k, torch.tensor([a, b])))
                pos, inside = where.position(cols_k[k0:k1])
                drop_r = torch.cat([rows_k[k0:k1][inside] - a, torch.arange(b - a)])
                gpos, ginside = where.position(target[a:b])
                drop_c = torch.cat([pos[inside], gpos])
                keep = torch.cat([torch.ones(int(inside.sum()), dtype=torch.bool), ginside])
                s[drop_r[keep].to(s.device), drop_c[keep].to(s.device)] = math.nan  # NaN never compares
                g = gold[a:b].to(s.device)[:, None]
                greater[a:b] += torch.count_nonzero(s > g, dim=1).double().cpu()
                if ties != "optimistic":
                    equal[a:b] += torch.count_nonzero(s == g, dim=1).double().cpu()
        out[direction] = _ranks(greater, equal, ties)
    return DirectionRanks(out["head"], out["tail"])


def _mix(x: Tensor) -> Tensor:
    """splitmix64 finaliser on int64 (wrapping): a counter-based draw, independent of chunking."""
    x = x ^ ((x >> 30) & 0x3FFFFFFFF)
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as int64
    x = x ^ ((x >> 27) & 0x1FFFFFFFFF)
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


def sampled_candidates(seed: int, group: int, k: int, n: int) -> Tensor:
    """The k entity ids (with repeats) drawn for query group ``group``."""
    counter = torch.tensor((seed * 1_000_003 + group) * 1_000_033, dtype=torch.long) + torch.arange(k)
    return (_mix(counter) & 0x7FFFFFFFFFFF) % n


def sampled_filtered_ranks(block_score: BlockScore, mine: Rows, triples_Q3: Tensor, first_query: int,
                           known: KnownTriples, k: int, seed: int, comm: Exchange | None = None,
                           ties: Ties = "realistic") -> DirectionRanks:
    """Ranks of this rank's queries (global indices first_query...) among k sampled candidates each
    (protocol "sampled-k"), filtered: known answers and the gold among the draws do not count."""
    comm = comm or _Alone()
    starts = _starts(comm.sizes(len(mine), torch.device("cpu")))
    n = int(starts[-1])
    triples = triples_Q3.long().cpu()
    q = len(triples)
    # chunks = the query groups this rank holds (cut at global multiples of SAMPLE_GROUP)
    cuts = sorted({0, q, *range((-first_query) % SAMPLE_GROUP, q, SAMPLE_GROUP)})
    spans = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    rounds = max(int(v) for v in comm.gather_rows(torch.tensor([len(spans)])).tolist()) if comm.world_size > 1 \
        else len(spans)
    out: dict[str, Tensor] = {}
    for direction in DIRECTIONS:
        predict_head = direction == "head"
        anchor_id, rel, target, anchor, gold = _direction(block_score, mine, triples, predict_head, comm, starts)
        ranks = torch.zeros(q, dtype=torch.float64)
        for i in range(rounds):  # the same number of fetches on every rank
            a, b = spans[i] if i < len(spans) else (0, 0)
            cand_id = sampled_candidates(seed, (first_query + a) // SAMPLE_GROUP, k, n) if b > a \
                else torch.zeros(0, dtype=torch.long)
            cand = fetch_rows(mine, cand_id, comm, starts)
            if b == a:
                continue
            s = block_score(anchor[a:b], rel[a:b], predict_head, cand).float().cpu()  # (c, k)
            # the candidate replaces the missing side; the anchor stays on its own side
            h = cand_id[None] if predict_head else anchor_id[a:b, None]
            t = anchor_id[a:b, None] if predict_head else cand_id[None]
            filtered = known.contains(h, rel[a:b, None], t) | (cand_id[None] == target[a:b, None])
            s[filtered] = math.nan
            g = gold[a:b, None]
            greater = torch.count_nonzero(s > g, dim=1).double()
            equal = torch.count_nonzero(s == g, dim=1).double()
            ranks[a:b] = _ranks(greater, equal, ties)
        out[direction] = ranks
    return DirectionRanks(out["head"], out["tail"])
