"""Stage 4 — classifier backbones and the metrics that judge generated and real data."""
