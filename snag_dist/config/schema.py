"""The typed config tree: one frozen, validated dataclass per component.

A component receives only its own sub-config (``NoiseConfig``, not the tree). Every field
carries a one-line doc (its ``description``) and a validator (type + range via pydantic).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field
from pydantic.dataclasses import dataclass

from snag_dist.engine.registry import BACKENDS

_FROZEN = ConfigDict(extra="forbid", frozen=True, validate_default=True)

Ratio = Annotated[float, Field(ge=0.0, le=1.0)]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0.0)]


def _registered_backend(name: str) -> str:
    """``engine.backend``: a name of the backend registry (``engine/registry.py``), the one list of backends."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} (registered: {', '.join(BACKENDS.names())})")
    return name


BackendName = Annotated[str, AfterValidator(_registered_backend)]


def doc(default, text: str, **kw):
    """A field with a default and a one-line description (the schema is the config's documentation)."""
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda d=default: type(d)(d), description=text, **kw)
    return Field(default=default, description=text, **kw)


@dataclass(config=_FROZEN)
class DataConfig:
    shards: str = doc("", "directory written by `snag-dist prepare` (manifest.json + shards)")
    shuffle_buffer: NonNegInt = doc(2048, "samples held by the streaming shuffle buffer (0 = no shuffle)")
    num_workers: NonNegInt = doc(0, "DataLoader worker processes per rank")
    block_size: PosInt = doc(65536, "triples/links per streamed block when re-batching")
    store_dir: str = doc("", "where the memory-mapped feature store is built ('' = SHARDS/.store)")
    mode: Literal["auto", "full", "stream"] = doc(
        "auto", "data path: full (every rank holds the graph; fastest for small graphs), stream (triples/links "
        "streamed per rank from the shards, features read per batch from the memory-mapped store, entity table "
        "sharded over ranks, GAT on sampled neighbourhoods) or auto (full when the full-graph estimate fits "
        "data.full_max_gib, else stream)")
    full_max_gib: PosFloat = doc(
        2.0, "auto mode: largest full-graph estimate (float32 features + entity table with its optimizer state "
        "+ triples, per process) that still takes the full path")
    stream_splits: NonNegInt = doc(
        0, "stream mode: virtual splits of an epoch (0 = processes x max(1, num_workers)); each rank reads "
        "splits rank::world; with a fixed value the epoch's global batches are the same for any process count "
        "that divides it")


# Modality names a dataset may or may not have: the default list names them all, and the ones absent
# from a run's data are skipped. Any other name must be a modality of the data (else a one-line error).
STANDARD_MODALITIES = ("structure", "relation", "attribute", "image", "name")


@dataclass(config=_FROZEN)
class ModelConfig:
    modalities: list[str] = doc(
        list(STANDARD_MODALITIES),
        "modalities to use: structure (learned) and feature modalities of the data; the standard ones "
        "(relation, attribute, image, name) absent from the manifest are skipped, any other name the data "
        "lacks is an error",
    )
    hidden: PosInt = doc(300, "hidden size of every modality token and of the fusion Transformer")
    structure_encoder: Literal["gat", "embedding"] = doc("gat", "structure encoder: GAT over the graph or plain embedding")
    gat_layers: NonNegInt = doc(2, "GAT layers")
    gat_heads: PosInt = doc(2, "GAT attention heads")
    gat_dropout: Ratio = doc(0.0, "GAT attention dropout")
    gat_fanout: list[int] = doc(
        [10, 10], "stream mode: neighbours sampled per node and GAT layer (input layer first; -1 = all); "
        "training and evaluation use the same fan-out")
    fusion: str = doc("transformer", "fusion of modality tokens: transformer (SNAG) or concat (MCLEA/EVA-style)")
    fusion_layers: PosInt = doc(1, "fusion Transformer layers")
    fusion_heads: PosInt = doc(1, "fusion Transformer attention heads")
    intermediate: PosInt = doc(400, "fusion Transformer feed-forward size")
    use_intermediate: bool = doc(True, "use the feed-forward block in the fusion layer")
    dropout: Ratio = doc(0.1, "dropout in the fusion Transformer")


@dataclass(config=_FROZEN)
class ModalityNoise:
    noise_ratio: Ratio = doc(0.2, "share of entities whose features are noised")
    mask_ratio: Ratio = doc(0.7, "weight of the Gaussian noise in the mix")


@dataclass(config=_FROZEN)
class NoiseConfig:
    enabled: bool = doc(True, "Gauss Modality Noise Masking during training (never at evaluation)")
    noise_ratio: Ratio = doc(0.2, "share of entities noised per modality")
    mask_ratio: Ratio = doc(0.7, "x -> (1-mask_ratio)*x + mask_ratio*eps")
    structure_scale: Ratio = doc(0.5, "structure modality uses noise_ratio and mask_ratio times this")
    resample: Literal["epoch", "step"] = doc("epoch", "when the noised entities are redrawn")
    draws: Literal["auto", "table", "keyed"] = doc(
        "auto", "how GMNM draws are made: table (per-epoch mask over all N entities, cached: the full-graph path), "
        "keyed (a pure function of seed, epoch/step, modality and entity id: no N-sized state, the same noise in "
        "any process or batch: the stream path), auto (the data path decides: table for full-graph, keyed for stream)")
    per_modality: dict[str, ModalityNoise] = doc({}, "per-modality overrides of noise_ratio/mask_ratio")


@dataclass(config=_FROZEN)
class AlignmentConfig:
    tau: PosFloat = doc(0.1, "contrastive temperature")
    gmi_weight: Annotated[float, Field(ge=0.0)] = doc(1.0, "weight of GMI (joint-embedding contrastive loss)")
    ecia_weight: Annotated[float, Field(ge=0.0)] = doc(1.0, "weight of ECIA (per-modality, confidence-weighted)")
    iir_weight: Annotated[float, Field(ge=0.0)] = doc(1.0, "weight of IIR (fusion hidden outputs)")
    csls_k: PosInt = doc(3, "CSLS neighbourhood size at evaluation")
    iterative: bool = doc(False, "iterative training with mutual-nearest-neighbour pseudo links")
    iterative_start: NonNegInt = doc(500, "epoch at which iterative training starts")
    mnn_every: PosInt = doc(5, "epochs between mutual-nearest-neighbour refreshes")
    pseudo_every: PosInt = doc(50, "epochs between adding pseudo links (the first after this many iterative epochs)")
    iterative_lr_div: PosFloat = doc(5.0, "lr divisor when iterative training starts")


@dataclass(config=_FROZEN)
class CompletionConfig:
    margin: PosFloat = doc(12.0, "RotatE margin gamma")
    distance: Literal["l1", "l2"] = doc(
        "l1", "|h o r - t|: sum of complex moduli (RotatE paper, the reference) or Euclidean norm (PyKEEN's RotatE)")
    negatives: PosInt = doc(32, "negative samples per positive triple")
    adv_temperature: Annotated[float, Field(ge=0.0)] = doc(2.0, "self-adversarial sampling temperature (0 = uniform)")
    readout: Literal["graph", "mean"] = doc("graph", "joint entity vector: structure token or mean of tokens")
    dim: NonNegInt = doc(0, "RotatE complex dimension D (entity vector = 2*D reals, D relation phases); 0 = hidden // 2")
    entity_residual: bool = doc(
        False, "add a free per-entity RotatE vector (zero-initialised table) to the projected readout")
    projection_layers: PosInt = doc(1, "layers projecting the readout to the RotatE vector (reference: 2 for graph)")
    corruption: Literal["bernoulli", "uniform"] = doc("bernoulli", "head-or-tail choice: Bernoulli rule or 50/50")
    negative_chunk: PosInt = doc(64, "positives sharing one draw of negatives (1 = own negatives per positive)")
    filter_negatives: bool = doc(True, "leave negatives that form a known training triple out of the loss")
    self_negative: Literal["none", "adversarial", "separate", "pairwise"] = doc(
        "adversarial", "the kept entity as a corruption ((h, r, h) for a new tail) unless that triple is known: "
        "none, one more negative in the self-adversarial softmax, its own -log sigmoid(-score) term beside "
        "the K negatives, or a pairwise term (true above self)")
    self_negative_weight: PosFloat = doc(1.0, "weight of the separate / pairwise self term in the loss")
    dedupe_valid: bool = doc(True, "select on validation triples that are not training triples (DB15K: 88% are)")
    kernel: Literal["auto", "compiled", "eager"] = doc("auto", "RotatE distance: torch.compile'd, eager, or by work size")


@dataclass(config=_FROZEN)
class TaskConfig:
    name: Literal["alignment", "completion"] = doc("alignment", "MMEA (alignment) or MKGC (completion)")
    alignment: AlignmentConfig = doc(AlignmentConfig(), "entity-alignment objectives")
    completion: CompletionConfig = doc(CompletionConfig(), "KG-completion objective")


@dataclass(config=_FROZEN)
class TrainConfig:
    epochs: PosInt = doc(100, "training epochs")
    max_steps: NonNegInt = doc(0, "stop after this many optimizer steps in all (0 = epochs decide)")
    steps_per_epoch: NonNegInt = doc(
        0, "cap on the batches of one epoch (0 = the whole split; for huge splits, an 'epoch' of this many steps)")
    batch_size: PosInt = doc(3500, "aligned pairs (alignment) or triples (completion) per step")
    lr: PosFloat = doc(5e-4, "peak learning rate")
    weight_decay: Annotated[float, Field(ge=0.0)] = doc(1e-3, "AdamW weight decay (not on biases/modality weights)")
    warmup_ratio: Ratio = doc(0.15, "share of steps with linear warm-up before the cosine decay")
    lr_schedule: Literal["cosine", "constant"] = doc(
        "cosine", "after the warm-up: cosine decay to 0 at the phase's end, or constant")
    embedding_lr_scale: PosFloat = doc(
        1.0, "lr multiplier for entity embedding tables (sparse rows, updated only when sampled)")
    lr_scales: dict[str, PosFloat] = doc(
        {}, "lr multipliers by parameter-name pattern (fnmatch, first match), e.g. {rotate.relation: 10}")
    grad_clip: Annotated[float, Field(ge=0.0)] = doc(1.0, "max gradient norm (0 = off)")
    grad_accum: PosInt = doc(1, "gradient accumulation steps")
    seed: int = doc(42, "seed for every random choice (combined with epoch and rank)")
    eval_every: NonNegInt = doc(10, "epochs between validation evaluations (0 = none: no selection, the last "
                                "weights are tested; for throughput runs)")
    patience: NonNegInt = doc(0, "evaluations without improvement before early stopping (0 = off)")
    checkpoint_every: NonNegInt = doc(0, "epochs between checkpoints (0 = only at the end)")
    checkpoint_every_steps: NonNegInt = doc(0, "optimizer steps between mid-epoch checkpoints (0 = off)")
    keep_last: PosInt = doc(2, "checkpoints kept")


@dataclass(config=_FROZEN)
class EngineConfig:
    backend: BackendName = doc("accelerate", f"distributed backend: {' or '.join(BACKENDS.names())}")
    precision: Literal["fp32", "bf16", "fp16"] = doc("fp32", "mixed precision")
    zero_stage: Annotated[int, Field(ge=0, le=3)] = doc(0, "DeepSpeed ZeRO stage")
    ds_config: str = doc("", "path of a DeepSpeed ds_config JSON ('' = built from this config)")
    fsdp: bool = doc(False, "Accelerate: FSDP instead of DDP")
    cpu: bool = doc(False, "force CPU even when an accelerator is present")
    keep_freed_memory: bool = doc(True, "glibc: keep freed large blocks in the heap (no per-step page faults; "
                                  "~10 % more RSS)")


@dataclass(config=_FROZEN)
class EvalConfig:
    split: Literal["valid", "test"] = doc(
        "valid", "split used for model selection during training ('test' is refused: it would select on test)")
    chunk_size: PosInt = doc(4096, "queries scored per chunk (memory O(chunk x entities))")
    test_at_end: bool = doc(True, "evaluate the best checkpoint on the test split at the end")
    protocol: Literal["auto", "exact", "topk"] = doc(
        "auto", "alignment ranking: 'exact' CSLS over every candidate (full MRR), or 'topk': faiss top-k "
        "cosine candidates re-ranked by CSLS (truncated: hits@k for k <= eval.topk and mrr@topk, never "
        "'mrr'); auto = exact up to eval.exact_max_links test links, topk above")
    exact_max_links: PosInt = doc(
        100_000, "auto: most links ranked exactly (cost ~4 x links^2 x width FLOP, split over the ranks)")
    topk: PosInt = doc(50, "protocol topk: candidates per query (>= task.alignment.csls_k)")
    index: Literal["flat", "ivf", "ivf_sq8", "hnsw"] = doc(
        "ivf_sq8", "protocol topk: faiss index (flat = exact search; ivf_sq8 = ivf scanning 8-bit codes, the "
        "2 x topk best re-scored exactly: exact cosines, ~2x faster than ivf on CPU)")
    ivf_lists: NonNegInt = doc(0, "ivf cells (0 = 4 sqrt(rows per rank))")
    ivf_probe: PosInt = doc(32, "ivf cells searched per query")
    max_queries: NonNegInt = doc(
        0, "completion: rank only the first N triples of the split (0 = all); metrics record 'queries'")
    completion_candidates: NonNegInt = doc(
        0, "completion: 0 = rank against every entity (full filtered); K > 0 = against K uniformly sampled "
        "entities per query (protocol 'sampled-K': its MRR is not comparable to full filtered MRR)")
    spill_mib: NonNegInt = doc(
        256, "completion on the stream path: a rank's entity vectors above this size (MiB) are kept in a "
        "temporary file ($TMPDIR) while ranking, read back block by block, so memory stays flat in N; 0 = in memory")


@dataclass(config=_FROZEN)
class TuneConfig:
    num_samples: PosInt = doc(8, "trials")
    search: Literal["random", "optuna"] = doc("random", "search algorithm")
    scheduler: Literal["asha", "none"] = doc("asha", "trial scheduler")
    max_concurrent: PosInt = doc(2, "trials running at once")
    cpus_per_trial: PosFloat = doc(1.0, "CPUs per trial (per worker when workers_per_trial > 1)")
    gpus_per_trial: Annotated[float, Field(ge=0.0)] = doc(0.0, "GPUs per trial (per worker, as above)")
    workers_per_trial: PosInt = doc(1, "processes per trial: > 1 runs each trial as a Ray Train TorchTrainer")
    grace_period: PosInt = doc(1, "ASHA: evaluations before a trial may be stopped")
    max_failures: NonNegInt = doc(1, "retries of a crashed trial from its last checkpoint")


@dataclass(config=_FROZEN)
class Config:
    name: str = doc("run", "run name")
    data: DataConfig = doc(DataConfig(), "shards and streaming")
    model: ModelConfig = doc(ModelConfig(), "SNAG encoders and fusion")
    noise: NoiseConfig = doc(NoiseConfig(), "Gauss Modality Noise Masking")
    task: TaskConfig = doc(TaskConfig(), "task and its objectives")
    train: TrainConfig = doc(TrainConfig(), "optimisation")
    engine: EngineConfig = doc(EngineConfig(), "backend and precision")
    eval: EvalConfig = doc(EvalConfig(), "evaluation")
    tune: TuneConfig = doc(TuneConfig(), "Ray Tune search")
