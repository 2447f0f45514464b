"""Stage 2 — generate synthetic training sets from a real dataset and a generator."""

from .synth import SynthConfig, SynthResult, synthesize

__all__ = ["SynthConfig", "SynthResult", "synthesize"]
