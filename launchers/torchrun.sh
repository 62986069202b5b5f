#!/usr/bin/env bash
# Launch `snag-dist train` with torchrun on one node or many (c10d rendezvous).
#
# One node, all local GPUs (or CPU processes):
#   NPROC=8 launchers/torchrun.sh --config dbp15k_fr_en --out runs/fr_en
# Several nodes: run the same command on every node with the same RDZV_ENDPOINT:
#   NNODES=4 NPROC=8 RDZV_ENDPOINT=node0:29500 RDZV_ID=fr_en launchers/torchrun.sh --config ... --out ...
# Environment: NNODES (1), NPROC (GPUs on this node, else 2), RDZV_ENDPOINT (127.0.0.1:29500),
# RDZV_ID (snag), OMP_NUM_THREADS (1 per process unless set). On CPU set DS_ACCELERATOR=cpu (done here).
set -euo pipefail
NNODES=${NNODES:-1}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export DS_ACCELERATOR=${DS_ACCELERATOR:-$(python -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
if [[ "$NNODES" == "1" && -z "${RDZV_ENDPOINT:-}" ]]; then
  exec torchrun --standalone --nproc_per_node "$NPROC" -m snag_dist train "$@"
fi
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "${RDZV_ENDPOINT:-127.0.0.1:29500}" --rdzv_id "${RDZV_ID:-snag}" \
  -m snag_dist train "$@"
