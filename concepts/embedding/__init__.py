"""Embedding: stream a dataset through a model into the store, and its masks onto the concept grid.

``embed`` captures chosen layers in one forward pass per batch (stopping after the last of them)
and stores them natively, sampled on the concept grid, or pooled; ``embed_masks`` stores the
concept masks on the grid once per dataset.

Unlike the other packages this one imports its names eagerly: the function ``embed`` shares its
name with the module ``embed``, and only an eager import keeps ``conceptlens.concepts.embedding.embed``
the function once the module has been imported.
"""

from conceptlens.concepts.embedding.embed import EmbedResult, embed, reduce_features
from conceptlens.concepts.embedding.masks import embed_masks

__all__ = ["EmbedResult", "embed", "embed_masks", "reduce_features"]
