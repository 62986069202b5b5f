"""KG completion: RotatE scores and loss by hand, batches across ranks, a short run on the real sample."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from snag_dist.cli import main
from snag_dist.config import Config, load_config
from snag_dist.data.prepare import PrepareOptions, prepare
from snag_dist.errors import ConfigError
from snag_dist.tasks.base import TaskContext
from snag_dist.tasks.completion import (
    CompletionBatch,
    CompletionTask,
    RotatE,
    RotatEScorer,
    head_probability,
    self_adversarial_loss,
)
from tests.conftest import SAMPLE


@pytest.fixture(scope="module")
def mini_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "db15k_mini"
    prepare(SAMPLE / "db15k_mini", out, PrepareOptions(text="chargram"), show_progress=False)
    return out


def small_cfg(shards, *extra: str):
    return load_config("quickstart_completion", [f"data.shards={shards}", "model.hidden=32", *extra])


# -- scores and loss against the formulas ------------------------------------------------------
def complex_of(ent: torch.Tensor) -> torch.Tensor:
    re, im = ent.chunk(2, dim=-1)
    return torch.complex(re.double(), im.double())


def complex_distance(diff: torch.Tensor, norm: str) -> torch.Tensor:
    """sum_d |diff_d| (l1) or sqrt(sum_d |diff_d|^2) (l2) over the last dimension."""
    return diff.abs().sum(-1) if norm == "l1" else diff.abs().pow(2).sum(-1).sqrt()


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_train_scores_match_the_complex_formula(norm):
    torch.manual_seed(0)
    rotate = RotatE(num_relations=3, dim=4, margin=6.0, norm=norm)
    rotate.groups = 4  # more groups than the batch needs: padding must not change anything
    ent = torch.randn(7, 8)
    triples = torch.tensor([[0, 0, 1], [2, 1, 3], [4, 2, 5], [6, 0, 0], [1, 1, 2]])
    head_side = torch.tensor([True, False, False, True, True])
    negatives = torch.tensor([[3, 4], [5, 6], [0, 1]])  # chunk 2: rows 0-1, 2-3, 4
    batch = CompletionBatch(triples, head_side, negatives, torch.ones(5, 2, dtype=torch.bool), chunk=2)
    pos, neg, own = rotate.train_scores(ent, batch, triples[:, 0], triples[:, 2], negatives)
    assert own is None
    z = complex_of(ent)
    phase = rotate.relation.detach().double() * math.pi / rotate.range
    rot = torch.polar(torch.ones_like(phase), phase)
    for i, (h, r, t) in enumerate(triples.tolist()):
        assert pos[i].item() == pytest.approx(6.0 - complex_distance(z[h] * rot[r] - z[t], norm).item(), abs=1e-4)
        for k, e in enumerate(negatives[i // 2].tolist()):
            corrupt = (z[e] * rot[r] - z[t]) if head_side[i] else (z[h] * rot[r] - z[e])
            assert neg[i, k].item() == pytest.approx(6.0 - complex_distance(corrupt, norm).item(), abs=1e-4)
    # Self negatives: one more column, the kept entity as the corruption ((t, r, t) or (h, r, h)).
    with_self = CompletionBatch(triples, head_side, negatives, torch.ones(5, 2, dtype=torch.bool), chunk=2,
                                self_valid=torch.ones(5, dtype=torch.bool))
    pos2, neg2, own = rotate.train_scores(ent, with_self, triples[:, 0], triples[:, 2], negatives)
    assert torch.equal(pos2, pos) and torch.equal(neg2, neg) and own.shape == (5,)
    for i, (h, r, t) in enumerate(triples.tolist()):
        kept = t if head_side[i] else h
        distance = complex_distance(z[kept] * rot[r] - z[kept], norm).item()
        assert own[i].item() == pytest.approx(6.0 - distance, abs=1e-4)


@pytest.mark.parametrize(("compiled", "norm"), [(False, "l1"), (True, "l1"), (False, "l2")])
def test_ranking_scorer_matches_the_complex_formula(compiled, norm):
    torch.manual_seed(1)
    rotate = RotatE(num_relations=2, dim=4, margin=12.0, norm=norm)
    table = torch.randn(9, 8)
    scorer = RotatEScorer(rotate, table, compiled=compiled)
    anchor, rel = torch.tensor([0, 3, 8]), torch.tensor([1, 0, 1])
    z = complex_of(table)
    phase = rotate.relation.detach().double() * math.pi / rotate.range
    rot = torch.polar(torch.ones_like(phase), phase)
    tails = scorer(anchor, rel, predict_head=False)
    heads = scorer(anchor, rel, predict_head=True)
    for i, (a, r) in enumerate(zip(anchor.tolist(), rel.tolist())):
        want_t = 12.0 - complex_distance(z[a] * rot[r] - z, norm)  # (a, r, e) for every e
        want_h = 12.0 - complex_distance(z * rot[r] - z[a], norm)  # (e, r, a) for every e
        assert torch.allclose(tails[i].double(), want_t, atol=1e-4)
        assert torch.allclose(heads[i].double(), want_h, atol=1e-4)


def test_self_adversarial_loss_by_hand():
    pos = torch.tensor([2.0])
    neg = torch.tensor([[1.0, 3.0, 0.0]], requires_grad=True)
    valid = torch.tensor([[True, True, False]])  # the third negative is a known triple: no weight
    out = self_adversarial_loss(pos, neg, valid, temperature=1.0)
    w1, w3 = math.exp(1) / (math.exp(1) + math.exp(3)), math.exp(3) / (math.exp(1) + math.exp(3))
    logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    negative = -(w1 * logsig(-1.0) + w3 * logsig(-3.0))
    positive = -logsig(2.0)
    assert out["positive"].item() == pytest.approx(positive, rel=1e-5)
    assert out["negative"].item() == pytest.approx(negative, rel=1e-5)
    assert out["loss"].item() == pytest.approx((positive + negative) / 2, rel=1e-5)
    out["loss"].backward()  # the weights are detached: d/dneg = w * sigmoid(neg) / 2
    assert neg.grad[0, 0].item() == pytest.approx(w1 * torch.sigmoid(torch.tensor(1.0)).item() / 2, rel=1e-5)
    assert neg.grad[0, 2].item() == 0.0
    uniform = self_adversarial_loss(pos, neg.detach(), valid, temperature=0.0)
    assert uniform["negative"].item() == pytest.approx(-(logsig(-1.0) + logsig(-3.0)) / 2, rel=1e-5)


def test_bernoulli_head_probability_by_hand():
    triples = torch.tensor([[0, 0, 1], [0, 0, 2], [0, 0, 3],  # 1-to-N: tph 3, hpt 1 -> 3/4
                            [1, 1, 0], [2, 1, 0]])  # N-to-1: tph 1, hpt 2 -> 1/3
    p = head_probability(triples, num_relations=3)
    assert p.tolist() == pytest.approx([0.75, 1 / 3, 0.5])  # relation 2 unseen: 50/50


# -- the task on the real sample ---------------------------------------------------------------
def test_batches_split_global_batches_and_filter_negatives(mini_shards):
    cfg = small_cfg(mini_shards, "train.batch_size=512")
    tasks = [CompletionTask.from_config(cfg, rank=r, world_size=2) for r in (0, 1)]
    train = tasks[0].triples["train"]
    facts = {tuple(t) for t in train.tolist()}
    per_rank = [list(t.batches(3)) for t in tasks]
    assert len(per_rank[0]) == len(per_rank[1]) == tasks[0].steps_per_epoch() == math.ceil(len(train) / 512)
    seen = torch.cat([b.triples for batches in per_rank for b in batches])
    assert len(seen) == len(train) and len(torch.unique(seen, dim=0)) == len(torch.unique(train, dim=0))
    batch, chunk = per_rank[0][0], tasks[0].ccfg.negative_chunk
    assert batch.negatives.shape == (math.ceil(256 / chunk), 32) and batch.chunk == chunk < 256
    for i, (h, r, t) in enumerate(batch.triples.tolist()):
        for k, e in enumerate(batch.negatives[i // chunk].tolist()):
            fact = (e, r, t) if batch.head_side[i] else (h, r, e)
            assert bool(batch.valid[i, k]) == (fact not in facts)
        kept = t if batch.head_side[i] else h
        assert bool(batch.self_valid[i]) == (h != t and (kept, r, kept) not in facts)
    again = next(iter(CompletionTask.from_config(cfg, 0, 2).batches(3)))
    assert torch.equal(again.triples, batch.triples) and torch.equal(again.negatives, batch.negatives)
    assert not (set(map(tuple, tasks[0].triples["valid"].tolist())) & facts)  # dedupe_valid


@pytest.mark.parametrize("extra", [["task.completion.readout=mean", "task.completion.projection_layers=2"],
                                   ["model.structure_encoder=gat", "model.gat_layers=1"]])
def test_readouts_and_gat_train_a_step(mini_shards, extra):
    task = CompletionTask.from_config(small_cfg(mini_shards, "train.batch_size=256", *extra))
    module = task.module
    task.on_epoch_start(0, module, None)
    losses = module(next(iter(task.batches(0))))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    emb = module.model.encoders["structure"].embedding.weight
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_entity_residual_starts_at_zero_and_learns_only_the_batch_rows(mini_shards):
    plain = CompletionTask.from_config(small_cfg(mini_shards, "train.batch_size=256"))
    torch.manual_seed(0)
    task = CompletionTask.from_config(
        small_cfg(mini_shards, "train.batch_size=256", "task.completion.entity_residual=true"))
    module = task.module
    assert module.residual.weight.shape == (task.num_entities, 2 * module.rotate.dim)
    ids = torch.arange(10)
    module.residual.weight.data[3] = 1.0  # the table is added to the projected fused vector, row by row
    with torch.no_grad():
        base = module.projection(module.model(ids, {k: v[ids] for k, v in module.inputs.graph.features.items()},
                                              module.inputs.graph.present[ids]).hidden_stack[:, 0])
        got = module.entity_vectors(ids)
    assert torch.allclose(got - base, module.residual.weight[ids]) and plain.module.residual is None
    module.residual.weight.data.zero_()
    task.on_epoch_start(0, module, None)
    batch = next(iter(task.batches(0)))
    module(batch)["loss"].backward()
    touched = torch.unique(torch.cat([batch.triples[:, 0], batch.triples[:, 2], batch.negatives.flatten()]))
    rows = module.residual.weight.grad.abs().sum(1) > 0
    assert rows[touched].all() and rows.sum() == len(touched)


def test_self_negative_modes_by_hand(mini_shards):
    """none: RotatE's loss; adversarial: the self score joins the softmax as one more negative;
    pairwise: + mean over valid rows of -log sigmoid(pos - self), halved like the other terms;
    separate (weight 0.3): + 0.3 x mean over valid rows of -log sigmoid(-self), halved."""
    losses, common = {}, ("train.batch_size=256", "noise.enabled=false", "model.dropout=0",
                          "task.completion.self_negative_weight=1.0")
    weights = CompletionTask.from_config(small_cfg(mini_shards, *common)).module.state_dict()
    for mode in ("none", "adversarial", "pairwise", "separate"):
        weight = ["task.completion.self_negative_weight=0.3"] if mode == "separate" else []
        task = CompletionTask.from_config(
            small_cfg(mini_shards, *common, f"task.completion.self_negative={mode}", *weight))
        task.module.load_state_dict(weights)
        batch = next(iter(task.batches(0)))
        assert (batch.self_valid is None) == (mode == "none")
        losses[mode] = (task.module(batch)["loss"].item(), batch, task)
    _, batch, task = losses["pairwise"]
    b = len(batch.triples)
    ids = torch.cat([batch.triples[:, 0], batch.triples[:, 2], batch.negatives.flatten()])
    uniq, inv = torch.unique(ids, return_inverse=True)
    ent = task.module.entity_vectors(uniq)
    pos, neg, own = task.module.rotate.train_scores(ent, batch, inv[:b], inv[b:2 * b], inv[2 * b:].view_as(batch.negatives))
    base = self_adversarial_loss(pos, neg, batch.valid, 2.0)["loss"].item()
    keep = batch.self_valid
    assert 0 < keep.sum() < b or keep.all()
    pairwise = -F.logsigmoid(pos - own)[keep].mean().item()
    assert losses["none"][0] == pytest.approx(base, rel=1e-5)
    assert losses["pairwise"][0] == pytest.approx(base + pairwise / 2, rel=1e-5)
    separate = -F.logsigmoid(-own)[keep].mean().item()
    assert losses["separate"][0] == pytest.approx(base + 0.3 * separate / 2, rel=1e-5)
    adv = self_adversarial_loss(pos, torch.cat([neg, own[:, None]], 1),
                                torch.cat([batch.valid, keep[:, None]], 1), 2.0)["loss"].item()
    assert losses["adversarial"][0] == pytest.approx(adv, rel=1e-5) and adv != pytest.approx(base)


def test_graph_readout_needs_the_structure_token(mini_shards):
    with pytest.raises(ConfigError, match="readout=graph"):
        CompletionTask.from_config(small_cfg(mini_shards, "model.modalities=[name]"))


def test_a_task_gets_its_section_and_a_context_never_the_whole_config(mini_shards):
    on, off = small_cfg(mini_shards, "noise.enabled=true"), small_cfg(mini_shards, "noise.enabled=false")
    context_on, context_off = TaskContext.from_config(on), TaskContext.from_config(off)
    assert context_on.noise == on.noise and context_off.noise is None  # the one switch of GMNM
    assert context_on.data == on.data and context_on.model == on.model
    assert context_on.train.table_lr == on.train.lr * on.train.embedding_lr_scale
    assert context_on.eval.chunk_size == on.eval.chunk_size
    with pytest.raises(dataclasses.FrozenInstanceError):
        context_on.noise = None
    task = CompletionTask(off.task.completion, context_off)
    assert task.module.model.noise is None
    assert not any(isinstance(value, Config) for value in vars(task).values())
    assert CompletionTask(on.task.completion, context_on).module.model.noise is not None
    assert task.metric == CompletionTask.metric_for(off) == "mrr"


def snag_dist_cli(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """The CLI in its own process, one OMP thread per process: on 2 cores shared with other work,
    2-thread OpenMP regions spin-wait on each other and a short run takes 5-20x longer."""
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone"] if nproc > 1 else []
    cmd = [sys.executable, *launch, "-m", "snag_dist", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def train_args(shards, run, *extra: str) -> list[str]:
    args = ["train", "--config", "quickstart_completion", "--out", str(run), "--quiet"]
    for s in (f"data.shards={shards}", *extra):
        args += ["--set", s]
    return args


def test_short_run_on_the_sample_learns(mini_shards, tmp_path):
    from snag_dist.engine.run import evaluate_run

    run = tmp_path / "run"
    res = snag_dist_cli(*train_args(mini_shards, run, "model.hidden=64", "train.epochs=6", "train.eval_every=3",
                                    "train.lr=5e-3"))
    assert res.returncode == 0, res.stderr[-3000:]
    test = json.loads((run / "summary.json").read_text())["test"]["base"]
    random_mrr = 1 / 2500
    assert test["mrr"] > 100 * random_mrr, test
    assert test["hits@1"] <= test["hits@3"] <= test["hits@10"] and test["hits@10"] > 0.15
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"epoch", "mrr", "hits@1", "hits@3", "hits@10", "head/mrr", "tail/mrr"} <= set(records[0])
    assert [r["split"] for r in records].count("test") == 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see snag_dist_cli
    try:
        again = evaluate_run(run, ("test",))
        # the sampled protocol: its own metric names, never "mrr"; the same draw for any process count
        sampled = evaluate_run(run, ("test",), ["eval.completion_candidates=50", "eval.max_queries=120"])["test"]
    finally:
        torch.set_num_threads(threads)
    assert again["test"]["mrr"] == pytest.approx(test["mrr"])
    assert records[0]["protocol"] == again["test"]["protocol"] == "full-filtered"
    assert sampled["protocol"] == "sampled-50" and sampled["queries"] == 120.0
    assert "mrr" not in sampled and sampled["sampled-50/mrr"] > test["mrr"]  # among 50, not 2,500
    _check_export(run, tmp_path / "export", test)


def _check_export(run, out, test_metrics):
    """The exported RotatE vectors and relation phases, read with plain safetensors, reproduce the test MRR."""
    from safetensors.numpy import load_file

    from snag_dist.eval.filtered import filtered_rank_stats, metrics_from_stats
    from snag_dist.export import export_run

    export_run(run, out)
    tensors = load_file(str(out / "embeddings.safetensors"))
    meta = json.loads((out / "embeddings.json").read_text())["rotate"]
    margin, norm = meta["margin"], meta["distance"]
    z = complex_of(torch.from_numpy(tensors["rotate.entity"]))
    phase = torch.from_numpy(tensors["rotate.relation_phase"]).double()
    rot = torch.polar(torch.ones_like(phase), phase)

    def score(anchor, rel, predict_head):
        r = rot[rel].conj() if predict_head else rot[rel]
        return margin - complex_distance(z[anchor][:, None] * r[:, None] - z[None], norm)

    task = CompletionTask.from_config(load_config(str(run / "config.yaml")))
    stats = filtered_rank_stats(score, task.triples["test"], task.known, 512, "realistic")
    assert metrics_from_stats(stats)["mrr"] == pytest.approx(test_metrics["mrr"], rel=1e-3)


@pytest.mark.dist
def test_two_processes_train_and_evaluate(mini_shards, tmp_path):
    """2 real processes (torchrun, gloo): equal step counts per rank, DDP over the batch dataclass."""
    run = tmp_path / "run"
    res = snag_dist_cli(*train_args(mini_shards, run, "model.hidden=32", "train.epochs=1", "train.eval_every=1",
                                    "train.lr=5e-3"), nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    test = json.loads((run / "summary.json").read_text())["test"]["base"]
    assert test["mrr"] > 20 / 2500, test


@pytest.mark.parametrize("case", ["entity", "relation"])
def test_unknown_entity_or_relation_is_a_prepare_error(case, tmp_path, capsys):
    src = tmp_path / "db15k_mini"
    shutil.copytree(SAMPLE / "db15k_mini", src)
    split, line, needles = {
        "entity": ("train.txt", "5\t3\t99999\n", ["train.txt", "entity id 99999", "out of range"]),
        "relation": ("test.txt", "5\t9999\t7\n", ["test.txt", "unknown relation id 9999"]),
    }[case]
    with open(src / split, "a") as fh:
        fh.write(line)
    out = tmp_path / "out"
    assert main(["prepare", str(src), "--out", str(out), "--quiet", "--text", "chargram"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()


def test_loss_of_a_batch_is_finite_with_everything_filtered():
    pos = torch.tensor([1.0, 2.0])
    neg = torch.zeros(2, 3)
    valid = torch.tensor([[False, False, False], [True, False, True]])
    out = self_adversarial_loss(pos, neg, valid, 2.0)
    assert torch.isfinite(out["loss"])
    assert out["negative"].item() == pytest.approx(-F.logsigmoid(torch.tensor(0.0)).item() / 2)



def test_rows_are_bucketed_under_cpu_autocast_only(mini_shards):
    """bf16 on CPU: oneDNN keeps a kernel per matmul shape, so the encoded rows come in multiples of 512
    (RSS grew per step before); the padding is sliced off and the loss matches the unpadded one."""
    from snag_dist.tasks.inputs import HALF_BUCKET as _HALF_BUCKET

    task = CompletionTask.from_config(small_cfg(mini_shards, "train.batch_size=256", "model.dropout=0"))
    module, seen = task.module, []
    encode = module.inputs.encode
    module.inputs.encode = lambda model, ids: (seen.append(len(ids)), encode(model, ids))[1]
    batch = next(iter(task.batches(0)))
    plain = module(batch)["loss"]
    unique = seen[-1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = module(batch)["loss"]
    assert unique % _HALF_BUCKET and seen[-1] % _HALF_BUCKET == 0 and unique < seen[-1] < unique + _HALF_BUCKET
    torch.testing.assert_close(half, plain, rtol=3e-2, atol=3e-2)


def test_rows_is_indexing_in_values_and_gradients():
    from snag_dist.tasks.completion.rotate import rows

    torch.manual_seed(0)
    table = torch.randn(9, 6, requires_grad=True)
    index = torch.tensor([[0, 3, 3], [8, 0, 5]])  # 2-D, with repeats: gradients add up
    got = rows(table, index)
    want = table[index]
    assert got.shape == (2, 3, 6) and torch.equal(got, want)
    g = torch.randn(2, 3, 6)
    assert torch.equal(torch.autograd.grad(got, table, g)[0], torch.autograd.grad(want, table, g)[0])
