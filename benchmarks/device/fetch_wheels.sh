#!/usr/bin/env bash
# Wheels of the packages the GPU image lacks (or has at other versions), for Python 3.12, into
# .whl/ (git-ignored); a device call names ".whl" in carry. The versions are this checkout's.
set -euo pipefail
cd "$(dirname "$0")/../.."
version() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "diffusers==$(version diffusers)" "transformers==$(version transformers)" \
    "open_clip_torch==$(version open_clip_torch)"
ls -l .whl
