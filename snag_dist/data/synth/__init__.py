"""Synthetic multi-modal KGs in the raw on-disk formats the readers take (scale tests, demos).

Every entity has a popularity rank (a power law, so a few hubs hold many edges) and a cluster
(``rank % K``). Each relation maps head clusters to tail clusters through a fixed permutation and
most edges follow that map, so an entity's cluster predicts its neighbours. Features encode the
cluster: modality = latent @ projection + noise, latent = cluster centroid + individual part.
Features are therefore learnable from structure and vice versa. For ``mmea``, KG2 is KG1 mapped
through the gold links with some edges dropped and others added, and a linked KG2 entity's latent
is its partner's plus noise, so both the structure and the features carry the alignment.

Triples and feature rows are generated and written in chunks, so 1M entities x 10M triples stays
well under 1 GiB of RSS. Output goes to a temp directory renamed into place at the end.

Modules, one job each: ``options`` (what to generate), ``graph`` (popularity, clusters, triples),
``text_writer`` (integer rows to text lines), ``layouts`` (the mkgc / mmea files), ``features``
(latents and feature tables), ``dataset`` (``synth``: the folder, written atomically).
"""

from snag_dist.data.synth.dataset import synth
from snag_dist.data.synth.options import DEFAULT_MODALITIES, ModalityOption, SynthOptions, parse_modalities

__all__ = ["DEFAULT_MODALITIES", "ModalityOption", "SynthOptions", "parse_modalities", "synth"]
