"""genaug: diffusion-based generative data augmentation and personalization.

Stages, each writing an artefact the next one reads: personalize (adapters) -> generate /
retrieve (datasets) -> train and evaluate (reports). See README.md.
"""

__version__ = "0.1.0"
