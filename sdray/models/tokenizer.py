"""The real CLIP BPE tokenizer, built offline from the vocabulary file in the `clip-anytorch` wheel.

Recipe (verified against openai/clip-vit-large-patch14): merges are lines [1, 48895) of
`bpe_simple_vocab_16e6.txt.gz`; the vocab is the 256 byte-level characters, the same with `</w>` appended,
one token per merge (the pair joined), then `<|startoftext|>` and `<|endoftext|>` -- 49408 ids.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

from sdray.errors import InputError
from sdray.models.config import ModelConfig, load_part_dir
from sdray.models.presets import CLIP_MAX_LENGTH

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_MERGES_END = 49152 - 256 - 2 + 1  # 48895: the merges CLIP uses


def _bpe_path() -> Path:
    # find_spec, not import: the `clip` package imports torchvision, which we do not install.
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the CLIP vocabulary needs `pip install --no-deps clip-anytorch==2.6.0`")
    path = Path(next(iter(spec.submodule_search_locations))) / _BPE_FILE
    if not path.is_file():
        raise InputError(f"{path} missing: reinstall clip-anytorch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _vocab_and_merges(bpe_file: Path) -> tuple[dict[str, int], list[str]]:
    with gzip.open(bpe_file, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1:_MERGES_END]
    tokens = list(_bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


@lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """The CLIP ViT-L/14 tokenizer: 49408 ids, pads and truncates to 77 tokens."""
    vocab, merges = _vocab_and_merges(_bpe_path())
    pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=CLIP_MAX_LENGTH)


def load_tokenizer(cfg: ModelConfig) -> CLIPTokenizer:
    """The model's tokenizer: the presets' CLIP tokenizer, or ``cfg.path``'s tokenizer/ folder.

    Imports neither diffusers nor the model classes (seconds of start-up per process), so processes that only
    tokenize (Serve's ingress, preprocessing's decode tasks) stay light.
    """
    if not cfg.path:
        return clip_tokenizer()
    return load_part_dir(
        cfg, "tokenizer", lambda path: CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    )
