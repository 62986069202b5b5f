"""Feature tables: a latent per entity (cluster centroid + individual part, or a linked partner's
latent + noise), projected per modality and noised, written as ``features/<m>.npy`` and
``<m>.present.npy``. Features are therefore learnable from structure and vice versa, and (``mmea``)
carry the alignment.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from snag_dist.data.npy_writer import NpyWriter
from snag_dist.data.synth.graph import FEAT, LATENT, MAX_CLUSTERS, PROJ, Segment
from snag_dist.data.synth.options import SynthOptions
from snag_dist.seeding import numpy_rng

LATENT_CHUNK = 1 << 17  # entity rows per latent chunk: a chunk's draws come from its own stream
FEATURE_CHUNK_ELEMS = 1 << 22  # floats per feature chunk (16 MiB as float32)
LATENT_DIM = 16
INDIVIDUAL_SCALE = 0.7  # individual part of the latent, relative to the unit-variance centroid
LINK_NOISE = 0.5  # latent noise between linked entities (one modality alone: hits@1 ~0.5 on name)
FEATURE_NOISE = 1.0  # per-modality noise, independent across modalities and linked entities
_BYTE_STD = float(np.sqrt((256**2 - 1) / 12))  # std of a uniform random int8


def write_latent(path: Path, seed: int, segments: list[Segment]) -> None:
    """(N, LATENT_DIM) float32 rows, raw: cluster centroid + individual part, or a partner's + noise."""
    centroids = numpy_rng(seed, LATENT).standard_normal((MAX_CLUSTERS, LATENT_DIM), dtype=np.float32)
    with open(path, "wb") as fh:
        for s, seg in enumerate(segments):
            fh.flush()
            earlier = None  # latents of the segments before this one, for partner lookups
            if seg.offset:
                earlier = np.memmap(path, dtype=np.float32, mode="r", shape=(seg.offset, LATENT_DIM))
            for k, start in enumerate(range(0, seg.graph.n, LATENT_CHUNK)):
                rng = numpy_rng(seed, LATENT, s, k)
                ids = np.arange(start, min(seg.graph.n, start + LATENT_CHUNK))
                noise = rng.standard_normal((len(ids), LATENT_DIM), dtype=np.float32)
                z = centroids[seg.graph.cluster(ids)] + INDIVIDUAL_SCALE * noise
                if seg.partner is not None and earlier is not None:
                    partner = seg.partner[ids]
                    linked = partner >= 0
                    z[linked] = earlier[partner[linked]] + LINK_NOISE * noise[linked]
                fh.write(z.tobytes())
            del earlier


def write_features(folder: Path, opts: SynthOptions, latent: Path, say: Callable[[str], None]) -> dict[str, int]:
    """features/<m>.npy and <m>.present.npy, streamed (``NpyWriter``: a memory map would keep every
    page written in this process's RSS, ~750 MiB for a 1M x 384 table alone)."""
    folder.mkdir()
    n, present = opts.entities, {}
    for i, mod in enumerate(opts.modalities):
        # Noise is uniform random bytes (4x cheaper than normals, which dominated the run time):
        # features are computed in units of the bytes' std, then rescaled.
        scale = np.float32(_BYTE_STD / FEATURE_NOISE)
        proj = numpy_rng(opts.seed, PROJ, i).standard_normal((LATENT_DIM, mod.dim), dtype=np.float32)
        proj *= scale / np.sqrt(LATENT_DIM)
        rows, present[mod.name] = max(1, FEATURE_CHUNK_ELEMS // mod.dim), 0
        feat_path, has_path = folder / f"{mod.name}.npy", folder / f"{mod.name}.present.npy"
        with NpyWriter(feat_path, opts.dtype, (n, mod.dim)) as feat, NpyWriter(has_path, np.uint8, (n,)) as has_fh:
            for k, start in enumerate(range(0, n, rows)):
                m = min(rows, n - start)
                z = np.fromfile(latent, dtype=np.float32, count=m * LATENT_DIM, offset=start * LATENT_DIM * 4)
                rng = numpy_rng(opts.seed, FEAT, i, k)
                x_mD = z.reshape(m, LATENT_DIM) @ proj  # m rows, D = mod.dim
                noise = np.frombuffer(rng.bytes(m * mod.dim), dtype=np.int8).reshape(m, mod.dim)
                np.add(x_mD, noise, out=x_mD, casting="unsafe")
                x_mD /= scale
                has = rng.random(m) < mod.coverage
                x_mD[~has] = 0.0
                feat.append(x_mD)
                has_fh.append(has)
                present[mod.name] += int(has.sum())
        say(f"features/{mod.name}.npy: {n} x {mod.dim}, {present[mod.name]} present")
    return present
