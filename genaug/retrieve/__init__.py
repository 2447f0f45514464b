"""Retrieval baseline: embed a pool with a CLIP encoder, index it with faiss, retrieve per class."""

from .index import IndexConfig, IndexResult, PoolIndex, build_index, choose_index_spec
from .retrieve import RetrieveConfig, RetrieveResult, retrieve

__all__ = ["IndexConfig", "IndexResult", "PoolIndex", "build_index", "choose_index_spec", "RetrieveConfig",
           "RetrieveResult", "retrieve"]
