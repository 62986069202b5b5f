"""``snag-dist export RUN_DIR --out OUT``: entity embeddings as safetensors + JSON, readable without snag_dist.

``OUT/embeddings.safetensors``: ``joint`` (N, M*H) test embedding (global modality weights),
``joint_attention`` (N, M*H) per-entity attention-weighted joint, ``modality.<m>`` (N, H) per
modality, ``modality_weights`` (N, M), ``entity_ids`` (N,), ``kg`` (N,). A completion run also
writes what its RotatE scorer ranks with: ``rotate.entity`` (N, 2D) (real parts, then imaginary)
and ``rotate.relation_phase`` (R, D) radians; score(h, r, t) = margin - sum_d |h_d e^{i phase_d} - t_d|
(distance "l1") or margin - ||h o e^{i phase} - t||_2 ("l2"); margin and distance in the JSON.
``OUT/embeddings.json``: modality order, shapes, the run and its config. Load with
``safetensors.numpy.load_file`` — no snag_dist needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from snag_dist.config import load_config, to_dict
from snag_dist.engine.checkpoint import load_checkpoint, load_rank_files
from snag_dist.engine.run import build_task, find_checkpoint, load_model_state
from snag_dist.errors import CheckpointError, DataError
from snag_dist.fsio import atomic_dir


@torch.no_grad()
def _embed_all(module, chunk: int) -> dict[str, torch.Tensor]:
    model, inputs = module.model, module.inputs
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    ids = torch.arange(inputs.num_entities)
    for a in range(0, len(ids), chunk):
        out = inputs.encode(model, ids[a:a + chunk])
        rows = {"joint": out.joint_global, "joint_attention": out.joint, "modality_weights": out.modality_weights,
                **{f"modality.{m}": out.modality_emb[m] for m in out.modalities}}
        for key, value in rows.items():
            parts.setdefault(key, []).append(value.float().cpu())
    tensors = {k: torch.cat(v) for k, v in parts.items()}
    tensors["entity_ids"] = ids
    tensors["kg"] = inputs.kg().cpu().to(torch.uint8)
    return tensors


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "best") -> Path:
    run_dir, out = Path(run_dir), Path(out_dir)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.yaml)")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"output directory {out} exists and is not empty")
    cfg = load_config(str(run_dir / "config.yaml"))
    path = find_checkpoint(run_dir, checkpoint)
    model_state, _, _ = load_checkpoint(path)
    task = build_task(cfg, 0, 1, torch.device("cpu"))
    load_model_state(task.module, model_state, path)
    if getattr(task, "table", None) is not None:  # stream path: the table's rows from every rank's file
        task.table.load_shards(load_rank_files(path, "table"))
    tensors = _embed_all(task.module, cfg.eval.chunk_size)
    rotate = getattr(task.module, "rotate", None)
    if rotate is not None:  # completion: the RotatE vectors of the fused entities and the relation phases
        tensors["rotate.entity"] = task.module.entity_table(cfg.eval.chunk_size).cpu()
        tensors["rotate.relation_phase"] = (rotate.relation.detach() * (math.pi / rotate.range)).float().cpu()
    with atomic_dir(out, replace_existing=False) as tmp:  # out: absent or empty (checked above)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "embeddings.safetensors"))
        meta = {"modalities": task.module.model.modalities, "shapes": {k: list(v.shape) for k, v in tensors.items()},
                "run": str(run_dir.resolve()), "checkpoint": checkpoint, "config": to_dict(cfg)}
        if rotate is not None:
            score = ("margin - sum_d |h_d * exp(i * phase_d) - t_d|" if rotate.norm == "l1"
                     else "margin - sqrt(sum_d |h_d * exp(i * phase_d) - t_d|^2)")
            meta["rotate"] = {"margin": rotate.margin, "dim": rotate.dim, "distance": rotate.norm,
                              "score": f"{score}, entity = [re, im]"}
        (tmp / "embeddings.json").write_text(json.dumps(meta, indent=1))
    return out
