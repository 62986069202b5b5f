"""2 real processes (torchrun, gloo) x 2 DataLoader workers see every sample exactly once per epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from snag_dist.data.prepare import PrepareOptions, prepare


def torchrun(*args: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone", "-m", "snag_dist", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_processes_two_workers_exactly_once(align_dir, tmp_path):
    src, truth = align_dir
    out = tmp_path / "shards"
    manifest = prepare(src, out, PrepareOptions(shard_size=9, min_shards=4), show_progress=False)
    # every group big enough gets >= ranks x workers shards (links/valid has a single link here)
    assert all(len(v) >= 4 for v in manifest.shards.values() if sum(s.rows for s in v) >= 4)
    report = tmp_path / "report.json"
    res = torchrun("stream", str(out), "--epochs", "2", "--workers", "2", "--batch-size", "5",
                   "--out", str(report))
    assert res.returncode == 0, res.stderr[-3000:]
    epochs = json.loads(report.read_text())
    assert [e["entities"] for e in epochs] == [truth["n"], truth["n"]]
    assert set(epochs[0]["groups"]) == {"triples/train", "links/train", "links/valid", "links/test"}
    # the seeded shuffle changes the order between epochs
    assert epochs[0]["first_ids"] != epochs[1]["first_ids"]
