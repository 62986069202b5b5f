"""Sharded evaluation with real processes (gloo): exact CSLS, mutual nearest neighbours, faiss top-k and
completion's filtered ranking over entity-vector blocks (full and sampled) over 2 and 3 ranks equal one
process."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.eval_driver import results
from tests.distributed.launch import ROOT, run, torchrun

pytest.importorskip("faiss")


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_alignment_evaluation_equals_one_process(tmp_path, world):
    run(torchrun(world, [str(tmp_path)], script=str(ROOT / "tests/distributed/eval_driver.py")), timeout=240)
    one = results(None)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(world)]
    for key in ("exact.l2r", "exact.r2l", "flat.l2r", "flat.r2l", "ivf.l2r", "ivf.r2l", "full.head", "full.tail",
                "sampled.head", "sampled.tail", "spilled.full.head", "spilled.full.tail", "spilled.sampled.head",
                "spilled.sampled.tail"):
        # each rank ranks its block of links; the blocks in rank order are the single-process ranks
        assert torch.equal(torch.cat([r[key] for r in ranks]), one[key]), key
    for key in ("full.head", "full.tail", "sampled.head", "sampled.tail"):  # vectors in a file: the same ranks
        assert torch.equal(one[f"spilled.{key}"], one[key]), key
    assert one["exact.l2r"].max() > 3 and torch.isinf(one["flat.l2r"]).any()  # non-trivial, truncated
    for key in ("mnn", "flat.mnn", "ivf.mnn"):
        assert len(one[key]) > 3
        for r in ranks:  # every rank holds all pairs
            assert torch.equal(r[key], one[key]), key
