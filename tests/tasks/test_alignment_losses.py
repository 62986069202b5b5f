"""GMI / ECIA / IIR: the contrastive loss itself, uncertainty weighting, term weights, absent modalities."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import pytest
import torch
import torch.nn.functional as F

from snag_dist.config.schema import AlignmentConfig
from snag_dist.tasks import AlignmentLoss, UncertaintyWeighting, check_losses, contrastive_loss

MODS = ["structure", "relation", "image"]


@dataclass
class FakeOut:
    """Stand-in for model.snag.SnagOutput: only the fields the loss reads, same shapes."""

    modalities: list[str]
    modality_emb: dict[str, torch.Tensor]  # (E, H)
    hidden: dict[str, torch.Tensor]  # (E, H)
    modality_weights: torch.Tensor  # (E, M)
    joint: torch.Tensor  # (E, M*H)
    joint_global: torch.Tensor  # (E, M*H)
    present: torch.Tensor  # (E, M) bool
    global_entity_weights: torch.Tensor  # (E, M)
    extra: dict = field(default_factory=dict)


def make_out(num_pairs: int = 6, hidden: int = 8, seed: int = 0, aligned: bool = True) -> FakeOut:
    """Entities 0..B-1 (left) aligned to B..2B-1 (right); right = left + noise when aligned."""
    gen = torch.Generator().manual_seed(seed)

    def table() -> torch.Tensor:
        left = torch.randn(num_pairs, hidden, generator=gen)
        right = left + 0.01 * torch.randn(num_pairs, hidden, generator=gen) if aligned else torch.randn(
            num_pairs, hidden, generator=gen
        )
        return torch.cat([left, right]).requires_grad_(True)

    emb = {m: table() for m in MODS}
    hid = {m: table() for m in MODS}
    weights = torch.softmax(torch.randn(2 * num_pairs, len(MODS), generator=gen), dim=1)
    global_w = torch.softmax(torch.randn(len(MODS), generator=gen), dim=0).expand(2 * num_pairs, -1)
    # As the model defines them: concat of L2-normalised modality embeddings times their weights.
    joint = torch.cat([F.normalize(emb[m], dim=1) * weights[:, i, None] for i, m in enumerate(MODS)], dim=1)
    joint_g = torch.cat([F.normalize(emb[m], dim=1) * global_w[:, i, None] for i, m in enumerate(MODS)], dim=1)
    present = torch.ones(2 * num_pairs, len(MODS), dtype=torch.bool)
    return FakeOut(list(MODS), emb, hid, weights, joint, joint_g, present, global_w)


def pairs(num_pairs: int = 6) -> torch.Tensor:
    return torch.stack([torch.arange(num_pairs), num_pairs + torch.arange(num_pairs)], dim=1)


def naive_contrastive(left: torch.Tensor, right: torch.Tensor, tau: float, weight=None) -> torch.Tensor:
    """The reference "icl" loss written out: explicit [cross | same-KG] logits and cross-entropy."""
    left, right = F.normalize(left.double(), dim=1), F.normalize(right.double(), dim=1)
    b = left.shape[0]
    eye = torch.eye(b, dtype=torch.bool)
    logits_a = torch.cat([left @ right.T, (left @ left.T).masked_fill(eye, -1e9)], dim=1) / tau
    logits_b = torch.cat([right @ left.T, (right @ right.T).masked_fill(eye, -1e9)], dim=1) / tau
    target = torch.arange(b)
    ce_a = F.cross_entropy(logits_a, target, reduction="none")
    ce_b = F.cross_entropy(logits_b, target, reduction="none")
    w = torch.ones(b, dtype=torch.float64) if weight is None else weight.double()
    return (w * 0.5 * (ce_a + ce_b)).sum() / b


def test_contrastive_matches_written_out_reference():
    gen = torch.Generator().manual_seed(1)
    left, right = torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen)
    weight = torch.rand(7, generator=gen)
    got = contrastive_loss(left, right, 0.1, weight)
    assert got.item() == pytest.approx(naive_contrastive(left, right, 0.1, weight).item(), rel=1e-5)


def test_perfect_alignment_beats_random_and_gradient_flows():
    aligned, shuffled = make_out(aligned=True), make_out(aligned=False)
    left, right = pairs()[:, 0], pairs()[:, 1]
    good = contrastive_loss(aligned.joint[left], aligned.joint[right], 0.1)
    bad = contrastive_loss(shuffled.joint[left], shuffled.joint[right], 0.1)
    assert good.item() < bad.item()
    bad.backward()
    grad = shuffled.modality_emb["structure"].grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_invalid_pairs_leave_the_loss_entirely():
    gen = torch.Generator().manual_seed(2)
    left, right = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    valid = torch.tensor([True, True, False, True, False, True])
    got = contrastive_loss(left, right, 0.1, valid_b=valid)
    # Same as the loss over the valid pairs alone: dropped pairs are not even negatives.
    assert got.item() == pytest.approx(contrastive_loss(left[valid], right[valid], 0.1).item(), rel=1e-5)
    none_valid = contrastive_loss(left, right, 0.1, valid_b=torch.zeros(6, dtype=torch.bool))
    assert none_valid.item() == 0.0


def test_loss_keys_and_detached_logs():
    out = make_out()
    losses = check_losses(AlignmentLoss(AlignmentConfig(), MODS)(out, pairs()))
    assert {"loss", "gmi", "ecia", "iir"} <= set(losses)
    assert {f"ecia/{m}" for m in MODS} <= set(losses)
    assert losses["loss"].requires_grad
    assert not any(v.requires_grad for k, v in losses.items() if k != "loss")


def test_total_is_weighted_sum_of_terms():
    cfg = AlignmentConfig(gmi_weight=0.5, ecia_weight=2.0, iir_weight=3.0)
    losses = AlignmentLoss(cfg, MODS)(make_out(), pairs())
    expected = 0.5 * losses["gmi"] + 2.0 * losses["ecia"] + 3.0 * losses["iir"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_gmi_is_joint_plus_global_joint():
    out = make_out(aligned=False)  # a loss far from 0, so float32 vs float64 agree to 1e-5
    cfg = AlignmentConfig(ecia_weight=0.0, iir_weight=0.0)
    losses = AlignmentLoss(cfg, MODS)(out, pairs())
    left, right = pairs()[:, 0], pairs()[:, 1]
    expected = naive_contrastive(out.joint[left], out.joint[right], 0.1) + naive_contrastive(
        out.joint_global[left], out.joint_global[right], 0.1
    )
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("term", ["gmi", "ecia", "iir"])
def test_zero_weight_removes_term(term):
    out = make_out()
    cfg = replace(AlignmentConfig(), **{f"{term}_weight": 0.0})
    module = AlignmentLoss(cfg, MODS)
    losses = module(out, pairs())
    assert losses[term].item() == 0.0
    others = sum(losses[t] for t in ("gmi", "ecia", "iir") if t != term)
    assert losses["loss"].item() == pytest.approx(others.item(), rel=1e-6)
    if term != "gmi":  # no parameters for a term that is never computed
        assert getattr(module, term) is None
        assert not any(name.startswith(term) for name, _ in module.named_parameters())


def test_uncertainty_weights_are_learnable_log_variances():
    module = AlignmentLoss(AlignmentConfig(), MODS)
    names = [name for name, _ in module.named_parameters()]
    assert names == ["ecia.log_var", "iir.log_var"]
    assert all("log_var" in n for n in names)  # the engine exempts these from weight decay
    before = module.ecia.log_var.detach().clone()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    module(make_out(aligned=False), pairs())["loss"].backward()
    assert module.ecia.log_var.grad.abs().min() > 0
    opt.step()
    assert not torch.equal(module.ecia.log_var.detach(), before)


def test_uncertainty_formula():
    weighting = UncertaintyWeighting(["a", "b"])
    with torch.no_grad():
        weighting.log_var.copy_(torch.tensor([0.5, -1.0]))
    got = weighting(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 1.0]))
    assert got.item() == pytest.approx(math.exp(-0.5) * 2 + 0.5 + math.exp(1.0) * 3 - 1.0, rel=1e-6)
    inactive = weighting(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0]))
    assert inactive.item() == pytest.approx(math.exp(-0.5) * 2 + 0.5, rel=1e-6)


def test_ecia_weights_each_pair_by_smaller_modality_weight():
    out = make_out(aligned=False)
    cfg = AlignmentConfig(gmi_weight=0.0, iir_weight=0.0)
    losses = AlignmentLoss(cfg, MODS)(out, pairs())
    left, right = pairs()[:, 0], pairs()[:, 1]
    col = MODS.index("relation")
    w = torch.minimum(out.modality_weights[left, col], out.modality_weights[right, col]) * len(MODS)
    emb = out.modality_emb["relation"]
    expected = naive_contrastive(emb[left], emb[right], 0.1, w)
    assert losses["ecia/relation"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_modality_weights_get_no_gradient_from_ecia():
    out = make_out()
    out.modality_weights.requires_grad_(True)
    cfg = AlignmentConfig(gmi_weight=0.0, iir_weight=0.0)
    AlignmentLoss(cfg, MODS)(out, pairs())["loss"].backward()
    assert out.modality_weights.grad is None


def test_absent_modality_is_excluded():
    out = make_out()
    col = MODS.index("image")
    out.present[2, col] = False  # left entity of pair 2 has no image
    module = AlignmentLoss(AlignmentConfig(gmi_weight=0.0), MODS)
    base = module(out, pairs())
    # Whatever the absent entity's image features (and its partner's), the loss is unchanged.
    with torch.no_grad():
        out.modality_emb["image"][2] = torch.randn(8)
        out.modality_emb["image"][6 + 2] = torch.randn(8)
        out.hidden["image"][2] = torch.randn(8)
    again = module(out, pairs())
    assert again["loss"].item() == pytest.approx(base["loss"].item(), rel=1e-6)
    assert again["ecia/structure"].item() == pytest.approx(base["ecia/structure"].item(), rel=1e-6)


def test_modality_absent_everywhere_or_missing_contributes_nothing():
    out = make_out()
    out.present[:, MODS.index("image")] = False
    module = AlignmentLoss(AlignmentConfig(gmi_weight=0.0, iir_weight=0.0), MODS)
    losses = module(out, pairs())
    assert losses["ecia/image"].item() == 0.0
    losses["loss"].backward()
    grad = module.ecia.log_var.grad
    assert grad[MODS.index("image")].item() == 0.0 and grad[0].item() != 0.0
    # A modality the loss knows but the model does not produce is simply inactive.
    wider = AlignmentLoss(AlignmentConfig(gmi_weight=0.0, iir_weight=0.0), MODS + ["name"])
    assert "ecia/name" not in wider(make_out(), pairs())


def test_check_losses_enforces_the_task_contract():
    x = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(KeyError):
        check_losses({"gmi": x.detach()})
    with pytest.raises(ValueError):
        check_losses({"loss": x, "gmi": x * 2})  # a log entry still attached to the graph
    with pytest.raises(ValueError):
        check_losses({"loss": torch.ones(2)})


@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_info_nce_gradients(with_mask):
    """The fused loss's hand-written backward equals numerical gradients (float64)."""
    from snag_dist.tasks.fused_nce import fused_info_nce

    gen = torch.Generator().manual_seed(3)
    left = F.normalize(torch.randn(7, 5, generator=gen, dtype=torch.float64), dim=1)
    right = F.normalize(torch.randn(7, 5, generator=gen, dtype=torch.float64), dim=1)
    ab, aa, bb = (x.clone().requires_grad_() for x in (left @ right.T, left @ left.T, right @ right.T))
    weight = torch.rand(7, generator=gen, dtype=torch.float64)
    valid = torch.tensor([1, 1, 0, 1, 1, 0, 1], dtype=torch.bool) if with_mask else None
    assert torch.autograd.gradcheck(lambda x, y, z: fused_info_nce(x, y, z, 0.1, weight, valid), (ab, aa, bb))


def test_fused_info_nce_matches_reference_with_dropped_pairs():
    from snag_dist.tasks.alignment_losses import contrastive_loss

    gen = torch.Generator().manual_seed(4)
    left, right = torch.randn(9, 6, generator=gen), torch.randn(9, 6, generator=gen)
    valid = torch.ones(9, dtype=torch.bool)
    valid[[2, 5]] = False
    got = contrastive_loss(left, right, 0.1, valid_b=valid)
    keep = valid.nonzero().flatten()  # dropped pairs are neither positives nor negatives
    expected = naive_contrastive(left[keep], right[keep], 0.1)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_row_sharded_loss_sums_to_the_global_batch_loss_and_gradient():
    """What each data-parallel rank computes (its rows vs the global batch) adds up to the whole."""
    from snag_dist.tasks.alignment_losses import info_nce, joint_similarities, similarities
    from snag_dist.tasks.fused_nce import RowInfoNCE

    gen = torch.Generator().manual_seed(0)
    n, d = 37, 8
    left = torch.randn(n, d, generator=gen, requires_grad=True)
    right = torch.randn(n, d, generator=gen, requires_grad=True)
    weight, valid = torch.rand(n, generator=gen), torch.rand(n, generator=gen) > 0.2
    w_l, w_r = torch.rand(n, 2, generator=gen), torch.rand(n, 2, generator=gen)
    other_l, other_r = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    unit = torch.ones(n, 2)

    def losses(rows):
        sims = [similarities(left, right, rows), similarities(other_l, other_r, rows)]
        return info_nce(sims[0], 0.1, weight, valid) + info_nce(joint_similarities(sims, w_l, w_r, unit, unit), 0.1)

    whole = losses(None)
    g_whole = torch.autograd.grad(whole, (left, right))
    parts = [losses(rows) for rows in (slice(0, 10), slice(10, 30), slice(30, 37))]
    g_parts = [torch.autograd.grad(p, (left, right)) for p in parts]
    assert torch.allclose(sum(p.detach() for p in parts), whole.detach(), rtol=1e-5)
    for k in range(2):
        assert torch.allclose(sum(g[k] for g in g_parts), g_whole[k], atol=1e-6)
    x = (torch.rand(5, 9, dtype=torch.float64) * 2 - 1).requires_grad_()
    y = (torch.rand(5, 9, dtype=torch.float64) * 2 - 1).requires_grad_()
    pos, coef, keep = torch.tensor([3, 4, 5, 6, 7]), torch.rand(5, dtype=torch.float64), (torch.rand(9) > 0.2).double()
    assert torch.autograd.gradcheck(lambda a, b: RowInfoNCE.apply(a, b, pos, 0.5, coef, keep), (x, y))


def test_gram_matches_plain_products_and_gradients():
    """The three cosine matrices and their symmetric-aware backward equal the plain products'."""
    from snag_dist.tasks.fused_nce import CHUNK, Gram

    gen = torch.Generator().manual_seed(5)
    n = 2 * CHUNK + 37  # several row blocks and tiles, ragged last ones
    left = torch.randn(n, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    right = torch.randn(n, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(n, n, generator=gen, dtype=torch.float64) for _ in range(3)]
    got = Gram.apply(left, right)
    want = (left @ right.T, left @ left.T, right @ right.T)
    for g, w in zip(got, want):
        assert torch.allclose(g, w)
    grads = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, weights)), (left, right))
    ref = torch.autograd.grad(sum((g * w).sum() for g, w in zip(want, weights)), (left, right))
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r)
    # An output without a gradient (only ab used) is skipped, not treated as zeros of the wrong kind.
    only_ab = torch.autograd.grad(Gram.apply(left, right)[0].sum(), (left, right))
    assert torch.allclose(only_ab[0], torch.autograd.grad((left @ right.T).sum(), left)[0])
    assert torch.autograd.gradcheck(Gram.apply, (left[:9].detach().requires_grad_(), right[:9].detach().requires_grad_()))


def test_weighted_sum_matches_broadcast_products_and_gradients():
    from snag_dist.tasks.fused_nce import CHUNK, WeightedSum

    gen = torch.Generator().manual_seed(6)
    rows, cols, m = CHUNK + 5, 11, 3
    a = torch.rand(rows, m, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.rand(cols, m, generator=gen, dtype=torch.float64, requires_grad=True)
    mats = [torch.randn(rows, cols, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(m)]
    want = sum(mats[k] * (a[:, k, None] * b[None, :, k]) for k in range(m))
    assert torch.allclose(WeightedSum.apply(a, b, *mats), want)
    small = [x[:7].detach().requires_grad_() for x in (a, *mats)]
    assert torch.autograd.gradcheck(lambda x, *s: WeightedSum.apply(x, b, *s), tuple(small))
    # Gradients only where asked for (the weights of ECIA's matrices need none).
    out = WeightedSum.apply(a.detach(), b, *mats)
    g = torch.autograd.grad(out.sum(), [b, mats[0]])
    assert torch.allclose(g[1], (a[:, 0, None] * b[None, :, 0]).detach().expand(rows, cols))


@pytest.mark.parametrize("with_mask", [False, True])
def test_joint_info_nce_equals_info_nce_of_weighted_sums(with_mask):
    """GMI's fused loss: same value and gradients as InfoNCE of the materialised joint matrices."""
    from snag_dist.tasks.fused_nce import CHUNK, InfoNCE, JointInfoNCE, WeightedSum

    gen = torch.Generator().manual_seed(7)
    n, m = CHUNK + 19, 2

    def leaf(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64).mul(2).sub(1).requires_grad_()

    mats = [leaf(n, n) for _ in range(3 * m)]  # ab_m..., aa_m..., bb_m...
    left, right = leaf(n, m), leaf(n, m)
    coef = torch.rand(n, generator=gen, dtype=torch.float64)
    keep = (torch.rand(n, generator=gen) > 0.3).double() if with_mask else None
    got = JointInfoNCE.apply(left, right, 0.1, coef, keep, *mats)
    ab = WeightedSum.apply(left, right, *mats[:m])
    aa = WeightedSum.apply(left, left, *mats[m:2 * m])
    bb = WeightedSum.apply(right, right, *mats[2 * m:])
    want = InfoNCE.apply(ab, aa, bb, 0.1, coef, keep)
    assert torch.allclose(got, want)
    inputs = [left, right, *mats]
    for g, w in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        assert torch.allclose(g, w)
    small = [x[:6, :6].detach().requires_grad_() for x in mats] + [x[:6].detach().requires_grad_() for x in (left, right)]
    k = keep[:6] if keep is not None else None
    assert torch.autograd.gradcheck(
        lambda *t: JointInfoNCE.apply(t[-2], t[-1], 0.5, coef[:6], k, *t[:-2]), tuple(small))


@pytest.mark.parametrize("rows", [None, slice(100, 400)])
def test_losses_run_in_fp32_under_bf16_autocast(rows):
    """The fused kernels mix out= writes and matmuls: under autocast they must still agree (fp32 cosines)."""
    from snag_dist.tasks.alignment_losses import info_nce, joint_info_nce, similarities

    def run():
        gen = torch.Generator().manual_seed(8)
        left = torch.randn(600, 16, generator=gen, requires_grad=True)
        right = torch.randn(600, 16, generator=gen, requires_grad=True)
        w = torch.rand(600, 2, generator=gen, requires_grad=True)
        unit = torch.ones(600, 2)
        sims = [similarities(left, right, rows), similarities(right, left, rows)]
        loss = info_nce(sims[0], 0.1) + joint_info_nce(sims, w, w, unit, unit, 0.1)
        return (loss, *torch.autograd.grad(loss, (left, right, w)))

    want = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run()
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.allclose(g, w, atol=1e-4)


def test_pseudo_link_precision_by_hand():
    from snag_dist.tasks.alignment import pseudo_link_precision

    gold = torch.tensor([[0, 10], [1, 11], [2, 12], [3, 13]])
    pseudo = torch.tensor([[0, 10], [1, 12], [2, 12], [5, 15], [3, 13]])  # 3 of 5 are gold pairs
    assert pseudo_link_precision(pseudo, gold) == 3 / 5
    assert pseudo_link_precision(pseudo[:, [1, 0]], gold) == 0.0  # direction matters: (left, right)
    assert math.isnan(pseudo_link_precision(torch.zeros(0, 2, dtype=torch.long), gold))
