"""A CLIP BPE tokenizer built locally, never fetched.

open_clip's wheel ships OpenAI's BPE merges (``bpe_simple_vocab_16e6.txt.gz``, MIT). Turned
into ``vocab.json`` + ``merges.txt`` with OpenAI's own recipe, it gives ``CLIPTokenizer`` the
exact ids of Stable Diffusion's tokenizer (49,408 tokens), so tiny models, the embedded model
family and real checkpoints all tokenize the same way.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path

from ..artefacts import atomic_write_text
from ..errors import ModelError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408


def _bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / BPE_FILE
        if candidate.is_file():
            return candidate
    raise ModelError(f"open_clip's {BPE_FILE} not found", fix="pip install open_clip_torch (it ships the CLIP vocabulary)")


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    # OpenAI CLIP's reversible byte -> printable-unicode map.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer_files(folder: str | Path) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs of CLIP's tokenizer into ``folder``."""
    folder = Path(folder)
    lines = gzip.open(_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE
    atomic_write_text(folder / "vocab.json", json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    atomic_write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2))
    return folder


def build_clip_tokenizer(folder: str | Path, model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """Write CLIP's tokenizer files to ``folder`` and load them as a ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        write_clip_tokenizer_files(folder)
    # transformers 5.x ignores vocab_file=/merges_file= given as keywords: pass them positionally.
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token)
    tokenizer.model_max_length = model_max_length
    return tokenizer
