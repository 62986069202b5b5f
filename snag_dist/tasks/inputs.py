"""Where a task's model inputs come from: the whole graph in memory, or per batch from the shards.

Both paths share the model and the task code; they differ only in how the rows a step asks for are
produced (``encode(model, ids) -> SnagOutput`` for the entities ``ids``):

* ``FullGraphInputs`` (``data.mode=full``, small graphs): every rank holds every entity's features,
  the training graph and the structure table (an ``nn.Embedding`` inside the model, data-parallel);
  the GAT runs on the whole graph (cut to the receptive field of the batch when that is small).
* ``StreamInputs`` (``data.mode=stream``): features of the batch's rows are read from the
  memory-mapped feature store, the structure rows are fetched from the row-sharded table
  (``model/sharded_table.py``), and the GAT runs on a seeded fan-out-sampled k-hop subgraph of the
  batch read from the memory-mapped CSR graph. A step costs O(batch x fan-out^k), not O(N).

``data.mode=auto`` picks full when the full-graph estimate (``full_graph_bytes``) fits
``data.full_max_gib`` per process, else stream.

Both paths key the fusion Transformer's dropout by entity id (``model.noise.KeyedDropout``): the task
sets the training position (``set_position(epoch, step)``) and ``encode`` names the rows' entities, so
a process that holds a share of a batch drops out what one process holding all of it does.
``encode_placeholder`` is a model call for a rank with no rows in a step (a global batch smaller than
the world, or a rank whose stream splits ran dry): it takes part in every collective of a step, and
its output, which no loss term uses, sends no gradient to any parameter or table row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from snag_dist.config import DataConfig
from snag_dist.data.graph_store import GraphStore
from snag_dist.data.manifest import STATS, Manifest, load_manifest
from snag_dist.data.store import FeatureStore
from snag_dist.data.stream import read_all_rows
from snag_dist.errors import ConfigError
from snag_dist.model.encoders import init_std
from snag_dist.model.noise import DropoutKeys, use_keyed_dropout
from snag_dist.model.sampling import sample_subgraph
from snag_dist.model.sharded_table import ShardedTable
from snag_dist.model.snag import SNAG, SnagOutput, build_snag
from snag_dist.model.spec import STRUCTURE, ModalitySpec, ModelSpec
from snag_dist.seeding import stable_seed
from snag_dist.tasks.base import Comm, TaskContext

_RELEASE_EVERY = 4  # batches between dropping the memory-mapped stores' pages from the resident set


def model_spec(root: Path, manifest: Manifest) -> ModelSpec:
    """Feature modalities with their per-dimension mean/std (what GMNM draws noise from)."""
    stats = load_file(str(root / STATS))
    mods = tuple(
        ModalitySpec(name, info.dim, torch.from_numpy(stats[f"{name}.mean"]), torch.from_numpy(stats[f"{name}.std"]))
        for name, info in manifest.modalities.items()
    )
    return ModelSpec(manifest.num_entities, mods)


def full_graph_bytes(manifest: Manifest, hidden: int, rows_group: str) -> int:
    """Per-process bytes the full path holds: float32 features of every entity, the structure table
    with its gradient and two Adam moments (4 copies), and the training rows as int64 (+ edges)."""
    n = manifest.num_entities
    feats = sum(info.dim for info in manifest.modalities.values()) * 4 * n
    table = 4 * 4 * hidden * n
    rows = sum(s.rows for s in manifest.shards.get(rows_group, [])) * 8 * 5
    return feats + table + rows


def resolve_mode(data: DataConfig, hidden: int, manifest: Manifest, rows_group: str) -> str:
    if data.mode != "auto":
        return data.mode
    return "full" if full_graph_bytes(manifest, hidden, rows_group) <= data.full_max_gib * 2**30 else "stream"


# -- full graph ------------------------------------------------------------------------------------
@dataclass
class GraphData:
    """Whole-graph inputs of a small/medium MMKG held on the training device.

    ids (N,), features {m: (N, D)}, present (N, M_spec) bool, edge_index (2, T) head -> tail.
    """

    ids: torch.Tensor
    features: dict[str, torch.Tensor]
    present: torch.Tensor
    edge_index: torch.Tensor
    kg: torch.Tensor

    def to(self, device: torch.device) -> GraphData:
        return GraphData(self.ids.to(device), {k: v.to(device) for k, v in self.features.items()},
                         self.present.to(device), self.edge_index.to(device), self.kg.to(device))


def load_graph(root: Path, store_dir: str = "") -> GraphData:
    manifest = load_manifest(root)
    table = FeatureStore.open(root, store_dir or None).all()
    triples = read_all_rows(root, "triples/train")
    edge_index = torch.from_numpy(np.ascontiguousarray(triples[:, [0, 2]].T))
    return GraphData(torch.arange(manifest.num_entities), table["features"], table["mask"], edge_index,
                     table["kg"])


# Under CPU autocast (bf16) the matmuls go to oneDNN, which builds and caches one kernel per shape: with
# a different number of rows every step, RSS grew ~6 MB per step (6 GB in a 20-epoch MKG-Y completion
# trial; +1 GB in 300 alignment steps on the shipped sample) and every step paid a kernel build. Padding
# the rows to a multiple of this keeps a few shapes.
HALF_BUCKET = 512


def bucketed(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` padded with copies of its first id to a multiple of HALF_BUCKET under CPU autocast, unchanged
    otherwise. Every row is encoded on its own (per-row GMNM, dropout keyed by entity id, attention within
    an entity's tokens, sampling keyed by entity), so the kept rows are the same with or without the copies."""
    if ids.device.type != "cpu" or not torch.is_autocast_enabled("cpu") or len(ids) == 0:
        return ids
    pad = -len(ids) % HALF_BUCKET
    return torch.cat([ids, ids[:1].expand(pad)]) if pad else ids


class _BucketedEncode:
    """``encode(model, ids)``: the rows of ``ids``, encoded in HALF_BUCKET multiples under CPU autocast."""

    def encode(self, model: SNAG, ids: torch.Tensor) -> SnagOutput:
        padded = bucketed(ids)
        out = self._encode(model, padded)
        return out if padded is ids else out.head(len(ids))


class FullGraphInputs(_BucketedEncode):
    """Every entity in memory; the model sees the whole graph."""

    table = None  # the structure table is the model's own nn.Embedding

    def __init__(self, graph: GraphData, dropout_keys: DropoutKeys | None = None) -> None:
        self.graph = graph
        self.num_entities = len(graph.ids)
        self.dropout_keys = dropout_keys or DropoutKeys(0)

    def kg(self) -> torch.Tensor:
        return self.graph.kg

    def set_position(self, epoch: int, step: int) -> None:
        self.dropout_keys.set_position(epoch, step)

    def _encode(self, model: SNAG, ids: torch.Tensor) -> SnagOutput:
        g = self.graph
        with self.dropout_keys.rows(ids):  # the fused rows are entities ids (g.ids is arange(N))
            if any(enc.uses_graph for enc in model.encoders.values()):
                return model(g.ids, g.features, g.present, g.edge_index, out_index=ids)
            # no graph encoder: only these rows are read, noised, encoded and fused
            feats = {k: v[ids] for k, v in g.features.items() if k in model.encoders}
            return model(ids, feats, g.present[ids])

    def encode_placeholder(self, model: SNAG) -> SnagOutput:
        """One row (entity 0) that no loss term uses: the dense weights get zero gradients from it."""
        return self.encode(model, torch.zeros(1, dtype=torch.long, device=self.graph.ids.device))

    def embed_chunk(self, chunk: int) -> int:
        # Every model call reruns the whole-graph GAT: chunks of at least N rows mean one GAT pass.
        return max(chunk, self.num_entities)


# -- stream ------------------------------------------------------------------------------------
def check_fanout(fanout: list[int], layers: int) -> list[int]:
    if len(fanout) != layers:
        raise ConfigError(f"model.gat_fanout={fanout} needs one value per GAT layer (model.gat_layers={layers})")
    bad = [f for f in fanout if f == 0 or f < -1]
    if bad:
        raise ConfigError(f"model.gat_fanout={fanout}: {bad[0]} neighbours cannot work; use >= 1 or -1 (all)")
    return list(fanout)


def open_stores(root: Path, store_dir: str, comm: Comm, graph: bool) -> tuple[FeatureStore, GraphStore | None]:
    """The memory-mapped feature store and CSR graph, built once: rank 0 builds, the others wait
    (a reduce is the barrier) and open what it wrote."""
    def build() -> tuple[FeatureStore, GraphStore | None]:
        return FeatureStore.open(root, store_dir or None), (GraphStore.open(root, store_dir or None) if graph else None)

    if comm.rank == 0:
        stores = build()
    comm.reduce_sum(torch.zeros(1))
    if comm.rank != 0:
        stores = build()
    return stores


class StreamInputs(_BucketedEncode):
    """Per-batch rows: features from the memory-mapped store, structure rows from the sharded table,
    the GAT on a sampled subgraph. Sampling is keyed by (seed, epoch, step) in training and by a
    fixed key in evaluation, so every process draws the same subgraph for an entity."""

    def __init__(self, store: FeatureStore, graph: GraphStore | None, table: ShardedTable | None,
                 fanout: list[int], seed: int, device: torch.device, dropout_keys: DropoutKeys | None = None) -> None:
        self.store, self.graph, self.table = store, graph, table
        store.advise_random()
        if graph is not None:
            graph.advise_random()
        self.fanout, self.seed, self.device = fanout, seed, device
        self.num_entities = store.stop - store.start
        self._key = stable_seed("sample", seed, 0, 0)
        self._lookups = 0
        self.dropout_keys = dropout_keys or DropoutKeys(seed)

    def kg(self) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.store.kg))

    def set_position(self, epoch: int, step: int) -> None:
        self._key = stable_seed("sample", self.seed, epoch, step)
        self.dropout_keys.set_position(epoch, step)

    def encode_placeholder(self, model: SNAG) -> SnagOutput:
        """One row (entity 0) that no loss term uses, whose table exchange asks for no row: every
        collective of a step runs, and no table row gets a (zero) sparse gradient, which SparseAdam
        would otherwise treat as a touch (a decay of the row's moments and a step)."""
        return self._encode(model, torch.zeros(1, dtype=torch.long), placeholder=True)

    def _table_rows(self, ids: torch.Tensor, placeholder: bool) -> torch.Tensor:
        if not placeholder:
            return self.table.rows(ids)
        none = self.table.rows(ids[:0])  # the step's exchange, for no row (a zero-row gradient comes back)
        return none.new_zeros(len(ids), none.shape[1]) + none.sum(0)

    def _encode(self, model: SNAG, ids: torch.Tensor, placeholder: bool = False) -> SnagOutput:
        ids_cpu = ids.cpu()
        looked = self.store.lookup(ids_cpu.numpy())
        self._lookups += 1
        if self._lookups % _RELEASE_EVERY == 0:  # keep the mapped pages out of this process's RSS
            self.store.release()
            if self.graph is not None:
                self.graph.release()
        feats = {k: v.to(self.device) for k, v in looked["features"].items() if k in model.encoders}
        sampled = None
        if STRUCTURE in model.encoders:
            encoder = model.encoders[STRUCTURE]
            if encoder.uses_graph:
                key = self._key if model.training else stable_seed("sample-eval", self.seed)
                sampled = sample_subgraph(self.graph.indptr, self.graph.indices, ids_cpu, self.fanout, key)
                sampled = sampled.to(self.device) if hasattr(sampled, "to") else sampled
                feats[STRUCTURE] = self._table_rows(sampled.nodes, placeholder)
            else:
                feats[STRUCTURE] = self._table_rows(ids_cpu, placeholder)
            feats[STRUCTURE] = feats[STRUCTURE].to(self.device)
        ids = ids.to(self.device)
        with self.dropout_keys.rows(ids):
            return model.forward_rows(ids, feats, looked["mask"].to(self.device), sampled)

    def embed_chunk(self, chunk: int) -> int:
        return chunk


def resample_noise(model: SNAG, table: ShardedTable | None, epoch: int, seed: int) -> None:
    """GMNM's draws for ``epoch`` (nothing when the model has no GMNM: ``TaskContext.noise`` was None).
    On the stream path the structure statistics come from the sharded table (the full path takes them
    from its nn.Embedding in ``SNAG.resample_noise``): per-dimension mean/std summed over every rank's rows."""
    model.resample_noise(epoch, seed)
    noise = model.noise
    if table is None or noise is None or STRUCTURE not in noise.names:
        return
    mean, std = table.moments()
    noise.set_stats(STRUCTURE, mean, std)


def build_inputs(context: TaskContext, comm: Comm, device: torch.device, rows_group: str
                 ) -> tuple[Manifest, ModelSpec, SNAG, FullGraphInputs | StreamInputs]:
    """The model and its input path for ``data.mode`` (``auto`` resolved by ``resolve_mode``)."""
    data, model_cfg, seed = context.data, context.model, context.train.seed
    root = Path(data.shards)
    manifest = load_manifest(root)
    spec = model_spec(root, manifest)
    stream = resolve_mode(data, model_cfg.hidden, manifest, rows_group) == "stream"
    model = build_snag(model_cfg, context.noise, spec, stream=stream)
    keys = DropoutKeys(seed)
    use_keyed_dropout(model.fusion, keys)  # fusion rows are entities: masks keyed by entity id
    if not stream:
        return manifest, spec, model, FullGraphInputs(load_graph(root, data.store_dir).to(device), keys)
    if context.precision == "fp16":
        raise ConfigError("engine.precision=fp16 with data.mode=stream: the sharded table's sparse gradients "
                          "are not loss-unscaled; use bf16 (or data.mode=full)")
    encoder = model.encoders[STRUCTURE] if STRUCTURE in model.encoders else None
    uses_graph = encoder is not None and encoder.uses_graph
    fanout = check_fanout(list(model_cfg.gat_fanout), model_cfg.gat_layers) if uses_graph else []
    store, graph = open_stores(root, data.store_dir, comm, uses_graph)
    table = None
    if encoder is not None:
        table = ShardedTable(manifest.num_entities, model_cfg.hidden, comm, seed, init_std(manifest.num_entities),
                             context.train.table_lr, device)
    return manifest, spec, model, StreamInputs(store, graph, table, fanout, seed, device, keys)
