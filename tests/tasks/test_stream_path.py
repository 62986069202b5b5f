"""The stream data path in one process: the epoch's rows are read exactly once over any number of
ranks/workers and make the same global batches; with unlimited fan-out the stream path computes
what the full-graph path computes (losses and gradients, GMNM on); a stream run trains, checkpoints
its sharded table, evaluates and exports; bad stream settings are one-line ConfigErrors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from snag_dist.config import load_config
from snag_dist.data.epoch_stream import EpochRows
from snag_dist.data.prepare import PrepareOptions, prepare
from snag_dist.data.stream import read_all_rows
from snag_dist.errors import ConfigError
from snag_dist.model.spec import STRUCTURE
from snag_dist.seeding import generator
from snag_dist.tasks.completion import CompletionTask
from snag_dist.tasks.inputs import StreamInputs
from tests.conftest import SAMPLE


@pytest.fixture(scope="module")
def stream_shards(tmp_path_factory):
    """The DB15K sample with small blocks: 8 training-triple shards of several blocks each."""
    out = tmp_path_factory.mktemp("shards") / "db15k_mini"
    prepare(SAMPLE / "db15k_mini", out, PrepareOptions(text="chargram", block_size=256, min_shards=8),
            show_progress=False)
    return out


def _epoch(rows_of_rank, epoch):
    return [list(r.local_steps(epoch)) for r in rows_of_rank]


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2), (4, 1)])
def test_every_row_once_and_the_same_global_batches_for_any_world(stream_shards, world, workers):
    everything = read_all_rows(stream_shards, "triples/train")
    kw = dict(batch_size=512, splits=8, seed=3, shuffle_buffer=4)

    def global_batches(w, nw, epoch):
        ranks = [EpochRows(stream_shards, "triples/train", rank=r, world_size=w, workers=nw, **kw) for r in range(w)]
        steps = _epoch(ranks, epoch)
        assert len({len(s) for s in steps}) == 1, "every rank takes the same number of steps"
        assert len(steps[0]) == ranks[0].steps(epoch)
        out = []
        for k in range(len(steps[0])):
            parts = {v: p for s in steps for v, p in zip(s[k].splits, s[k].parts, strict=True) if not s[k].repeated}
            out.append(np.concatenate([parts[v] for v in sorted(parts)]))
        return out

    batches = global_batches(world, workers, epoch=1)
    seen = np.concatenate(batches)
    assert len(seen) == len(everything)  # no row twice, none missing
    key = lambda a: np.sort(a[:, 0] * 10**12 + a[:, 1] * 10**6 + a[:, 2])  # noqa: E731
    assert np.array_equal(key(seen), key(everything))
    reference = global_batches(1, 0, epoch=1)
    assert all(np.array_equal(a, b) for a, b in zip(batches, reference, strict=True))
    other_epoch = global_batches(1, 0, epoch=2)
    assert not np.array_equal(other_epoch[0], reference[0])  # reshuffled per epoch


def test_resume_position_replays_the_rest_of_the_epoch(stream_shards):
    rows = EpochRows(stream_shards, "triples/train", batch_size=300, splits=4, workers=2, seed=1, shuffle_buffer=3)
    whole = [s.rows for s in rows.local_steps(0)]
    rest = [s.rows for s in rows.local_steps(0, start=3)]
    assert all(np.array_equal(a, b) for a, b in zip(whole[3:], rest, strict=True))


@pytest.mark.parametrize("kw", [dict(splits=-1), dict(world_size=-1), dict(splits=2, world_size=2, workers=2)])
def test_bad_stream_layout_is_a_config_error(stream_shards, kw):
    from snag_dist.data.manifest import load_manifest

    shards = len(load_manifest(stream_shards).shards["triples/train"])
    kw = {k: (shards + 1 if v == -1 else v) for k, v in kw.items()}  # -1: more than there are shards
    with pytest.raises(ConfigError, match="data.stream_splits"):
        EpochRows(stream_shards, "triples/train", batch_size=64, **kw)


def _cfg(shards, mode, *extra):
    return load_config("quickstart_completion", [
        f"data.shards={shards}", f"data.mode={mode}", "model.hidden=32", "model.dropout=0",
        "model.structure_encoder=gat", "model.gat_fanout=[-1,-1]", "noise.enabled=true", "noise.draws=keyed",
        "noise.noise_ratio=0.5", "train.batch_size=256", *extra])


def test_stream_with_all_neighbours_equals_the_full_graph_path(stream_shards):
    torch.manual_seed(0)
    full = CompletionTask.from_config(_cfg(stream_shards, "full"))
    torch.manual_seed(0)
    stream = CompletionTask.from_config(_cfg(stream_shards, "stream"))
    assert isinstance(stream.inputs, StreamInputs) and stream.table is not None
    assert STRUCTURE not in {n.split(".")[2] for n, _ in stream.module.named_parameters() if "embedding" in n}
    state = {k: v for k, v in full.module.state_dict().items() if "embedding" not in k}
    stream.module.load_state_dict(state, strict=False)
    embedding = full.module.model.encoders[STRUCTURE].embedding.weight
    with torch.no_grad():
        stream.table.weight.copy_(embedding)
    for task in (full, stream):
        task.module.train()
        task.on_epoch_start(0, task.module, task.phases(1)[0])
    triples = read_all_rows(stream_shards, "triples/train")[:200]
    batch = full.make_batch(torch.from_numpy(triples), generator(0, 1))
    loss_full = full.module(batch)
    loss_stream = stream.module(batch)
    for key in loss_full:
        assert float(loss_stream[key].detach()) == pytest.approx(float(loss_full[key].detach()), rel=1e-5), key
    loss_full["loss"].backward()
    loss_stream["loss"].backward()
    dense_stream = dict(stream.module.named_parameters())
    for name, p in full.module.named_parameters():
        if "embedding" in name:
            continue
        if p.grad is None:  # a weight this loss does not reach
            assert dense_stream[name].grad is None, name
            continue
        assert torch.allclose(dense_stream[name].grad, p.grad, rtol=1e-4, atol=1e-7), name
    table_grad = stream.table.weight.grad.to_dense()
    assert table_grad.abs().sum() > 0
    assert torch.allclose(table_grad, embedding.grad, rtol=1e-4, atol=1e-8)


def test_stream_run_trains_checkpoints_evaluates_and_exports(stream_shards, tmp_path):
    from snag_dist.engine.run import evaluate_run, train
    from snag_dist.export import export_run

    cfg = _cfg(stream_shards, "stream", "model.gat_fanout=[5,5]", "train.epochs=2", "train.eval_every=1",
               "train.checkpoint_every=1", "train.max_steps=7")
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["test"]["base"]["mrr"] > 0
    best = tmp_path / "run" / "checkpoints" / "best"
    assert (best / "table.rank0.0.safetensors").is_file()
    records = [line for line in (tmp_path / "run" / "train.jsonl").read_text().splitlines()]
    assert sum(__import__("json").loads(r)["steps"] for r in records) == 7  # train.max_steps
    again = evaluate_run(tmp_path / "run", ("test",))
    assert again["test"]["mrr"] == pytest.approx(summary["test"]["base"]["mrr"], abs=1e-6)
    with pytest.MonkeyPatch.context() as mp:  # the vectors kept in a file while ranking (eval.spill_mib)
        mp.setattr(CompletionTask, "_spill", lambda self, module: True)
        spilled = evaluate_run(tmp_path / "run", ("test",))
    assert spilled["test"]["mrr"] == again["test"]["mrr"]
    out = export_run(tmp_path / "run", tmp_path / "export")
    from safetensors.numpy import load_file

    emb = load_file(str(out / "embeddings.safetensors"))
    assert emb["joint"].shape[0] == emb["entity_ids"].shape[0] and np.isfinite(emb["joint"]).all()


def test_zero_fanout_is_a_config_error(stream_shards):
    with pytest.raises(ConfigError, match="model.gat_fanout"):
        CompletionTask.from_config(_cfg(stream_shards, "stream", "model.gat_fanout=[0,5]"))
