"""Fused (B, B) kernels of the alignment losses: the in-batch InfoNCE over cosine matrices, the
batch's three cosine matrices (``Gram``), their per-modality weighted sums (``WeightedSum``) and the
InfoNCE of those sums without materialising them (``JointInfoNCE``, GMI).

Written with plain tensor ops, the loss makes ~25 passes over each (B, B) matrix forward and
backward (masking copies, divisions, log-sum-exp's max/sub/exp/sum, softmax in the backward); at
B = 3,500 those passes, not the matmuls, dominated a training step on CPU. Here every matrix is
read once in the forward and once in the backward, in row chunks that stay in cache.

Cosines lie in [-1, 1], so logits lie in [-1/tau, 1/tau] and exp(logit - 1/tau) in [e^(-2/tau), 1]:
a fixed shift replaces the per-row max of log-sum-exp (safe in float32 for tau >= 0.025).

Per pair i (left l_i, right r_i) with keep mask k (dropped pairs are neither positives nor negatives):
    lse_a(i) = log( sum_j k_j e^{ab_ij/tau} + sum_{j != i} k_j e^{aa_ij/tau} )      left i vs all
    lse_b(i) = log( sum_j k_j e^{ab_ji/tau} + sum_{j != i} k_j e^{bb_ij/tau} )      right i vs all
    loss     = sum_i c_i (0.5 (lse_a(i) + lse_b(i)) - ab_ii / tau),  c_i = k_i w_i / max(1, #kept or B)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

CHUNK = 256  # rows per block: 256 x B floats stay in L2/L3 for B in the thousands


def _without_autocast(fn: Callable) -> Callable:
    """Runs an autograd Function's forward or backward with autocast off (on the device of its first
    tensor argument): the kernels compute in their inputs' dtype, fp32 cosines from ``similarities``
    (logits / tau would amplify bf16 rounding), and write through out= buffers autocast leaves alone."""

    @functools.wraps(fn)
    def run(ctx, *args):
        first = next((a for a in args if isinstance(a, Tensor)), None)
        with torch.autocast(first.device.type if first is not None else "cpu", enabled=False):
            return fn(ctx, *args)

    return run


def _blocks(n: int, chunk: int = CHUNK):
    for a in range(0, n, chunk):
        yield a, min(n, a + chunk)


def _scratch(like: Tensor) -> Tensor:
    """One reusable (CHUNK, cols) block: a fresh multi-MB tensor per block costs page faults that
    took longer than the arithmetic on it."""
    return like.new_empty(min(CHUNK, like.shape[0]), like.shape[1])


def _exp_block(block: Tensor, inv_tau: float, keep: Tensor | None, diag_at: int | None, out: Tensor) -> Tensor:
    """exp((x - 1) / tau) of a row block into ``out``, kept columns only, optional zeroed diagonal."""
    e = out[: block.shape[0]]
    # -1/tau + x/tau in one pass (a 0-dim tensor broadcasts), then exp in place.
    torch.add(block.new_tensor(-inv_tau), block, alpha=inv_tau, out=e).exp_()
    if keep is not None:
        e.mul_(keep)
    if diag_at is not None:
        e.diagonal(offset=diag_at).zero_()
    return e


def _drop_all_true(keep: Tensor | None) -> Tensor | None:
    """None for an all-ones keep mask: multiplying by 1.0 changes nothing, it only costs passes."""
    return None if keep is None or bool(keep.all()) else keep


Blocks = Callable[[int, int], tuple[Tensor, Tensor, Tensor]]


def _lse(blocks: Blocks, n: int, inv: float, keep: Tensor | None, buf: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Both directions' log-sum-exp (n,) and the positives' cosines ab_ii (n,), from the row
    blocks (ab, aa, bb)[a:b] that ``blocks(a, b)`` gives."""
    sum_a, sum_b, pos = buf.new_zeros(n), buf.new_zeros(n), buf.new_empty(n)  # sum_b: ab columns + bb rows
    keep_row = keep[None, :] if keep is not None else None
    for a, b in _blocks(n):
        ab, aa, bb = blocks(a, b)
        pos[a:b] = ab.diagonal(offset=a)
        e = _exp_block(ab, inv, keep_row, None, buf)
        sum_a[a:b] += e.sum(1)
        sum_b += e.sum(0) if keep is None else keep[a:b] @ e
        sum_a[a:b] += _exp_block(aa, inv, keep_row, a, buf).sum(1)
        sum_b[a:b] += _exp_block(bb, inv, keep_row, a, buf).sum(1)
    return sum_a.clamp_min(1e-30).log_() + inv, sum_b.clamp_min(1e-30).log_() + inv, pos


def _write_grads(blocks: Blocks, outs: Blocks, n: int, inv: float, keep: Tensor | None, c: Tensor,
                 lse: tuple[Tensor, Tensor], buf: Tensor, then: Callable[[int, int], None] | None = None) -> None:
    """Writes the loss gradient of each row block of (ab, aa, bb) into ``outs(a, b)``, then calls
    ``then(a, b)``; ``c`` is each pair's coefficient times the incoming gradient."""
    half_a = 0.5 * c * torch.exp(inv - lse[0]) * inv  # softmax scale of direction a, per row
    half_b = 0.5 * c * torch.exp(inv - lse[1]) * inv
    keep_row = keep[None, :] if keep is not None else None
    # d/d ab_ij = e_ij k_j (half_a_i + k_i half_b_j): the second factor is one rank-1 update.
    keep_col = keep if keep is not None else c.new_ones(n)
    for a, b in _blocks(n):
        (ab, aa, bb), (g_ab, g_aa, g_bb) = blocks(a, b), outs(a, b)
        g = _exp_block(ab, inv, keep_row, None, g_ab)
        g.mul_(torch.addr(half_a[a:b, None], keep_col[a:b], half_b, out=buf[: b - a]))
        g.diagonal(offset=a).sub_(c[a:b] * inv)
        _exp_block(aa, inv, keep_row, a, g_aa).mul_(half_a[a:b, None])
        _exp_block(bb, inv, keep_row, a, g_bb).mul_(half_b[a:b, None])
        if then is not None:
            then(a, b)


def _saved_keep(keep: Tensor | None, like: Tensor) -> Tensor:
    return keep if keep is not None else like.new_ones(0)


def _loaded_keep(keep: Tensor) -> Tensor | None:
    return keep if keep.numel() else None


class InfoNCE(torch.autograd.Function):
    @staticmethod
    @_without_autocast
    def forward(ctx, ab: Tensor, aa: Tensor, bb: Tensor, tau: float, coef: Tensor, keep: Tensor | None):
        inv = 1.0 / tau
        lse_a, lse_b, pos = _lse(lambda a, b: (ab[a:b], aa[a:b], bb[a:b]), ab.shape[0], inv, keep, _scratch(ab))
        ctx.save_for_backward(ab, aa, bb, coef, lse_a, lse_b, _saved_keep(keep, ab))
        ctx.tau = tau
        return (coef * (0.5 * (lse_a + lse_b) - pos * inv)).sum()

    @staticmethod
    @_without_autocast
    def backward(ctx, grad: Tensor):
        ab, aa, bb, coef, lse_a, lse_b, keep = ctx.saved_tensors
        g_ab, g_aa, g_bb = torch.empty_like(ab), torch.empty_like(aa), torch.empty_like(bb)
        _write_grads(lambda a, b: (ab[a:b], aa[a:b], bb[a:b]), lambda a, b: (g_ab[a:b], g_aa[a:b], g_bb[a:b]),
                     ab.shape[0], 1.0 / ctx.tau, _loaded_keep(keep), coef * grad, (lse_a, lse_b), _scratch(ab))
        return g_ab, g_aa, g_bb, None, None, None


def _symmetrised(g: Tensor) -> Tensor:
    """g + g^T of a square matrix, by CHUNK x CHUNK tiles: the whole-matrix transposed add strides
    across memory and took as long as a (B, B) @ (B, 300) matmul."""
    out, n = torch.empty_like(g), g.shape[0]
    for i0, i1 in _blocks(n):
        for j0 in range(i0, n, CHUNK):
            j1 = min(n, j0 + CHUNK)
            tile = torch.add(g[i0:i1, j0:j1], g[j0:j1, i0:i1].T, out=out[i0:i1, j0:j1])
            if j0 != i0:
                out[j0:j1, i0:i1].copy_(tile.T)
    return out


def _side_grad(g_cross: Tensor | None, cross: Tensor, g_same: Tensor | None, same: Tensor) -> Tensor | None:
    """g_cross @ cross + (g_same + g_same^T) @ same, leaving out terms without a gradient."""
    out = None if g_cross is None else g_cross @ cross
    if g_same is not None:
        sym = _symmetrised(g_same)
        out = sym @ same if out is None else out.addmm_(sym, same)
    return out


_GRAM_ROWS, _MIRROR_TILE = 2 * CHUNK, CHUNK // 2  # the row blocks must be whole tiles


def _self_gram(x: Tensor) -> Tensor:
    """x @ x^T from its block upper triangle: each block of rows times the rows from its first one on
    (~57 % of the products at B = 3,500), the lower tiles mirrored (cache-sized transposed copies)."""
    n = x.shape[0]
    out = x.new_empty(n, n)
    for i0, i1 in _blocks(n, _GRAM_ROWS):
        torch.mm(x[i0:i1], x[i0:].T, out=out[i0:i1, i0:])
    for i0, i1 in _blocks(n, _MIRROR_TILE):
        for j0 in range(0, i0, _MIRROR_TILE):  # tiles left of the diagonal; (j, i) is computed
            j1 = j0 + _MIRROR_TILE
            out[i0:i1, j0:j1].copy_(out[j0:j1, i0:i1].T)
    return out


class Gram(torch.autograd.Function):
    """(left @ right^T, left @ left^T, right @ right^T) of (B, D) inputs: the batch's three cosine
    matrices from unit rows.

    The left/left and right/right products are symmetric: forward, only their block upper triangle
    is multiplied; backward, autograd would spend two (B, B) @ (B, D) products on each, but their
    gradient is (g + g^T) @ x, one product after a cheap tiled transpose add: 4 instead of 6.
    """

    @staticmethod
    @_without_autocast
    def forward(ctx, left: Tensor, right: Tensor):
        ctx.set_materialize_grads(False)  # an unused output stays None instead of a zero (B, B)
        ctx.save_for_backward(left, right)
        return left @ right.T, _self_gram(left), _self_gram(right)

    @staticmethod
    @_without_autocast
    def backward(ctx, g_ab: Tensor | None, g_aa: Tensor | None, g_bb: Tensor | None):
        left, right = ctx.saved_tensors
        g_left = _side_grad(g_ab, right, g_aa, left) if ctx.needs_input_grad[0] else None
        g_ba = None if g_ab is None else g_ab.T
        g_right = _side_grad(g_ba, left, g_bb, right) if ctx.needs_input_grad[1] else None
        return g_left, g_right


def _combine_into(out: Tensor, tmp: Tensor, mats: Sequence[Tensor], x: Tensor, y_cols: Tensor, a: int) -> Tensor:
    """Rows a:a+len(out) of sum_m (x_m y_m^T) * S_m into ``out``; y_cols = y^T, contiguous (a strided
    column broadcast along rows is several times slower); tmp: scratch of out's shape."""
    b = a + out.shape[0]
    torch.mul(mats[0][a:b], y_cols[0], out=out).mul_(x[a:b, 0, None])
    for m in range(1, len(mats)):
        out.addcmul_(torch.mul(mats[m][a:b], y_cols[m], out=tmp), x[a:b, m, None])
    return out


def _combine_grad(g: Tensor, tmp: Tensor, mats: Sequence[Tensor], x: Tensor, y_cols: Tensor, a: int,
                  g_x: Tensor | None, g_y: Tensor | None, g_mats: Sequence[Tensor | None]) -> None:
    """Given g, the gradient of rows a:a+len(g) of sum_m (x_m y_m^T) * S_m: add the weights' shares
    to g_x / g_y and write the matrices' rows into g_mats (each where not None)."""
    b = a + g.shape[0]
    for m, mat in enumerate(mats):
        if g_x is not None or g_y is not None:
            prod = torch.mul(g, mat[a:b], out=tmp)
            if g_x is not None:
                g_x[a:b, m] += prod @ y_cols[m]
            if g_y is not None:
                g_y[:, m] += x[a:b, m] @ prod
        if g_mats[m] is not None:
            torch.mul(g, y_cols[m], out=g_mats[m][a:b]).mul_(x[a:b, m, None])


class WeightedSum(torch.autograd.Function):
    """out_ij = sum_m a_im b_jm S_m,ij for matrices S_m (n, c) and weights a (n, M), b (c, M).

    The joint embeddings' cosines from the per-modality ones (``joint_similarities``). Written with
    broadcast products, every term is a fresh (n, c) outer product, a product and a sum forward,
    and as many backward; here each row block is combined in cache and the weights' gradients are
    matrix-vector products of (g * S_m).
    """

    @staticmethod
    @_without_autocast
    def forward(ctx, a: Tensor, b: Tensor, *mats: Tensor) -> Tensor:
        out, tmp, b_cols = torch.empty_like(mats[0]), _scratch(mats[0]), b.T.contiguous()
        for r0, r1 in _blocks(out.shape[0]):
            _combine_into(out[r0:r1], tmp[: r1 - r0], mats, a, b_cols, r0)
        ctx.save_for_backward(a, b, *mats)
        return out

    @staticmethod
    @_without_autocast
    def backward(ctx, g: Tensor):
        a, b, *mats = ctx.saved_tensors
        g_a = torch.zeros_like(a) if ctx.needs_input_grad[0] else None
        g_b = torch.zeros_like(b) if ctx.needs_input_grad[1] else None
        g_mats = [torch.empty_like(g) if need else None for need in ctx.needs_input_grad[2:]]
        tmp, b_cols = _scratch(g), b.T.contiguous()
        for r0, r1 in _blocks(g.shape[0]):
            _combine_grad(g[r0:r1], tmp[: r1 - r0], mats, a, b_cols, r0, g_a, g_b, g_mats)
        return g_a, g_b, *g_mats


def _joint_parts(mats: Sequence[Tensor], left: Tensor, right: Tensor) -> list[tuple[Sequence[Tensor], Tensor, Tensor]]:
    """(matrices, row weights, column weights^T) of the joint ab, aa and bb; mats = ab_m..., aa_m..., bb_m..."""
    m, l_cols, r_cols = left.shape[1], left.T.contiguous(), right.T.contiguous()
    return [(mats[:m], left, r_cols), (mats[m:2 * m], left, l_cols), (mats[2 * m:], right, r_cols)]


def _joint_blocks(parts: list[tuple[Sequence[Tensor], Tensor, Tensor]], like: Tensor) -> Blocks:
    """``blocks(a, b)`` giving rows a:b of the joint (ab, aa, bb), built in reused scratch blocks."""
    cos, tmp = [_scratch(like) for _ in parts], _scratch(like)

    def blocks(a: int, b: int) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(_combine_into(c[: b - a], tmp[: b - a], *part, a) for c, part in zip(cos, parts))

    return blocks


class JointInfoNCE(torch.autograd.Function):
    """InfoNCE (as ``InfoNCE``) of the joint cosines ab = sum_m (l_m r_m^T) * ab_m, aa = sum_m
    (l_m l_m^T) * aa_m and bb = sum_m (r_m r_m^T) * bb_m, from per-modality cosine matrices and
    weights l, r (B, M) of the left and right entities: GMI's loss.

    Equal to ``InfoNCE`` of ``WeightedSum``'s products, but the joint matrices and their gradients
    only ever exist as row blocks in cache: 6 fewer (B, B) tensors written and read back.
    """

    @staticmethod
    @_without_autocast
    def forward(ctx, left: Tensor, right: Tensor, tau: float, coef: Tensor, keep: Tensor | None, *mats: Tensor):
        parts, inv = _joint_parts(mats, left, right), 1.0 / tau
        lse_a, lse_b, pos = _lse(_joint_blocks(parts, mats[0]), left.shape[0], inv, keep, _scratch(mats[0]))
        ctx.save_for_backward(left, right, coef, lse_a, lse_b, _saved_keep(keep, left), *mats)
        ctx.tau = tau
        return (coef * (0.5 * (lse_a + lse_b) - pos * inv)).sum()

    @staticmethod
    @_without_autocast
    def backward(ctx, grad: Tensor):
        left, right, coef, lse_a, lse_b, keep, *mats = ctx.saved_tensors
        need_w = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        g_left, g_right = (torch.zeros_like(left), torch.zeros_like(right)) if need_w else (None, None)
        g_mats = [torch.empty_like(x) if need else None for x, need in zip(mats, ctx.needs_input_grad[5:])]
        parts, m = _joint_parts(mats, left, right), left.shape[1]
        g_parts = [(g_left, g_right, g_mats[:m]), (g_left, g_left, g_mats[m:2 * m]), (g_right, g_right, g_mats[2 * m:])]
        grads, tmp = [_scratch(mats[0]) for _ in parts], _scratch(mats[0])

        def scatter(a: int, b: int) -> None:
            for g, part, g_part in zip(grads, parts, g_parts):
                _combine_grad(g[: b - a], tmp[: b - a], *part, a, *g_part)

        _write_grads(_joint_blocks(parts, mats[0]), lambda a, b: tuple(g[: b - a] for g in grads), left.shape[0],
                     1.0 / ctx.tau, _loaded_keep(keep), coef * grad, (lse_a, lse_b), _scratch(mats[0]), then=scatter)
        return g_left, g_right, None, None, None, *g_mats


def fused_info_nce(ab: Tensor, aa: Tensor, bb: Tensor, tau: float, pair_weight_b: Tensor | None = None,
                   valid_b: Tensor | None = None) -> Tensor:
    """InfoNCE both ways from cosine matrices (B, B); weighted mean over valid pairs."""
    n = ab.shape[0]
    weight = ab.new_ones(n) if pair_weight_b is None else pair_weight_b.detach().to(ab.dtype)
    keep = None
    if valid_b is not None:
        keep = valid_b.to(ab.dtype)
        coef = weight * keep / keep.sum().clamp_min(1.0)
    else:
        coef = weight / n
    return InfoNCE.apply(ab, aa, bb, tau, coef, _drop_all_true(keep))


def fused_joint_info_nce(ab: Sequence[Tensor], aa: Sequence[Tensor], bb: Sequence[Tensor], left: Tensor,
                         right: Tensor, tau: float) -> Tensor:
    """``fused_info_nce`` (no weights, every pair valid) of the joint cosines from per-modality
    cosine matrices and weights left, right (B, M) (see ``JointInfoNCE``)."""
    n = left.shape[0]
    return JointInfoNCE.apply(left, right, tau, left.new_ones(n) / n, None, *ab, *aa, *bb)


class RowInfoNCE(torch.autograd.Function):
    """One direction of the InfoNCE for a block of rows against all columns (the row-sharded form).

    Row i (global pair ``pos_i``) scores its cross-KG candidates ``cross[i, :]`` (positive at
    ``pos_i``) and its same-KG negatives ``same[i, j != pos_i]``: loss_i = lse_i - cross[i, pos_i]/tau.
    Each process of a data-parallel run takes the rows of its own pairs, so the (B, B) work is split.
    """

    @staticmethod
    @_without_autocast
    def forward(ctx, cross: Tensor, same: Tensor, pos: Tensor, tau: float, coef: Tensor, keep: Tensor | None):
        n, inv = cross.shape[0], 1.0 / tau
        total = cross.new_zeros(n)
        keep_row = keep[None, :] if keep is not None else None
        rows = torch.arange(n, device=cross.device)
        buf = _scratch(cross)
        for a, b in _blocks(n):
            total[a:b] += _exp_block(cross[a:b], inv, keep_row, None, buf).sum(1)
            e = _exp_block(same[a:b], inv, keep_row, None, buf)
            e[rows[: b - a], pos[a:b]] = 0.0
            total[a:b] += e.sum(1)
        lse = total.clamp_min(1e-30).log_() + inv
        per_row = lse - cross[rows, pos] * inv
        ctx.save_for_backward(cross, same, pos, coef, lse, _saved_keep(keep, cross))
        ctx.tau = tau
        return (coef * per_row).sum()

    @staticmethod
    @_without_autocast
    def backward(ctx, grad: Tensor):
        cross, same, pos, coef, lse, keep = ctx.saved_tensors
        keep = _loaded_keep(keep)
        keep_row = keep[None, :] if keep is not None else None
        n, inv = cross.shape[0], 1.0 / ctx.tau
        c = coef * grad
        scale = c * torch.exp(inv - lse) * inv
        rows = torch.arange(n, device=cross.device)
        g_cross, g_same = torch.empty_like(cross), torch.empty_like(same)
        for a, b in _blocks(n):
            _exp_block(cross[a:b], inv, keep_row, None, g_cross[a:b]).mul_(scale[a:b, None])
            e = _exp_block(same[a:b], inv, keep_row, None, g_same[a:b])
            e[rows[: b - a], pos[a:b]] = 0.0
            e.mul_(scale[a:b, None])
        g_cross[rows, pos] -= c * inv
        return g_cross, g_same, None, None, None, None


def fused_row_info_nce(ab: Tensor, aa: Tensor, ba: Tensor, bb: Tensor, pos: Tensor, tau: float,
                       pair_weight: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
    """The both-ways InfoNCE of ``fused_info_nce`` restricted to the rows ``pos`` of the global batch.

    ab/aa: (b, B) this block's lefts vs all rights / lefts; ba/bb: its rights vs all lefts / rights;
    ``pair_weight`` and ``valid`` (B,) are over the global batch. Summed over the blocks of all rows,
    the result equals ``fused_info_nce`` of the global batch.
    """
    n_all = ab.shape[1]
    weight = ab.new_ones(n_all) if pair_weight is None else pair_weight.detach().to(ab.dtype)
    keep = None
    if valid is not None:
        keep = valid.to(ab.dtype)
        coef = (weight * keep)[pos] / keep.sum().clamp_min(1.0)
    else:
        coef = weight[pos] / n_all
    keep = _drop_all_true(keep)
    return 0.5 * (RowInfoNCE.apply(ab, aa, pos, tau, coef, keep) + RowInfoNCE.apply(ba, bb, pos, tau, coef, keep))
