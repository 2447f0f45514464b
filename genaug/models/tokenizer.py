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


def _clip_merges() -> list[tuple[str, str]]:
    lines = gzip.open(_bpe_path()).read().decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]


# CLIP's pre-tokenizer (lower-cased text): words, single digits, runs of other symbols.
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def merges_used_by(corpus: list[str], merges: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """The BPE merges that CLIP applies to the words of ``corpus`` (OpenAI's BPE loop, recorded)."""
    import regex

    ranks = {m: i for i, m in enumerate(merges)}
    byte_encoder = _bytes_to_unicode()
    words = {w for text in corpus for w in regex.findall(_WORD_PATTERN, " ".join(text.lower().split()))}
    used: set[tuple[str, str]] = set()
    for w in words:
        token = "".join(byte_encoder[b] for b in w.encode("utf-8"))
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            bigram = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if bigram not in ranks:
                break
            used.add(bigram)
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
    return used


def write_clip_tokenizer_files(folder: str | Path, corpus: list[str] | None = None) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs of CLIP's tokenizer into ``folder``.

    With ``corpus``, keep only the merges its words use (in CLIP's order): the corpus tokenizes
    exactly as with the full vocabulary, any other word falls back to smaller pieces, and a
    small model's token-embedding table shrinks from 49,408 rows to a few hundred.
    """
    folder = Path(folder)
    merges = _clip_merges()
    if corpus is not None:
        keep = merges_used_by(corpus, merges)
        merges = [m for m in merges if m in keep]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
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


def build_clip_tokenizer(folder: str | Path, model_max_length: int = 77, pad_token: str = "<|endoftext|>",
                         corpus: list[str] | None = None):
    """Write CLIP's tokenizer files to ``folder`` (pruned to ``corpus`` if given); load a ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if corpus is not None or not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        write_clip_tokenizer_files(folder, corpus)
    # transformers 5.x ignores vocab_file=/merges_file= given as keywords: pass them positionally.
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token)
    tokenizer.model_max_length = model_max_length
    tokenizer.init_kwargs["model_max_length"] = model_max_length  # so save_pretrained keeps it
    return tokenizer
