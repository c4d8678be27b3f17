"""Model loading, built-in models and the architecture registry."""
from qdoctor.models.loading import load
from qdoctor.models.registry import ARCHITECTURES, ArchSpec, SmoothPair, arch_for, get_blocks

__all__ = ["load", "ARCHITECTURES", "ArchSpec", "SmoothPair", "arch_for", "get_blocks"]
