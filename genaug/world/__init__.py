"""The procedural world genaug generates instead of downloading datasets (``genaug world``)."""

from .build import WorldConfig, WorldResult, build_world, world_object_masks, write_masks

__all__ = ["WorldConfig", "WorldResult", "build_world", "world_object_masks", "write_masks"]
