"""The SNAG model: modality encoders, Gauss Modality Noise Masking, fusion, assembly."""

from snag_dist.model.encoders import (
    ENCODERS,
    LinearEncoder,
    ModalityEncoder,
    StructureEncoder,
    build_encoders,
)
from snag_dist.model.fusion import FUSIONS, ConcatFusion, FusionOutput, TransformerFusion, build_fusion
from snag_dist.model.gat import GAT, DiagGATLayer, undirected_edges
from snag_dist.model.noise import GaussModalityNoise
from snag_dist.model.snag import SNAG, MultiModalModel, SnagOutput, build_noise, build_snag, select_modalities
from snag_dist.model.spec import STRUCTURE, ModalitySpec, ModelSpec

__all__ = [
    "ENCODERS", "FUSIONS", "GAT", "SNAG", "STRUCTURE",
    "ConcatFusion", "DiagGATLayer", "FusionOutput", "GaussModalityNoise", "LinearEncoder",
    "ModalityEncoder", "ModalitySpec", "ModelSpec", "MultiModalModel", "SnagOutput", "StructureEncoder",
    "TransformerFusion",
    "build_encoders", "build_fusion", "build_noise", "build_snag", "select_modalities", "undirected_edges",
]
