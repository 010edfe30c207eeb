"""Text tokenizers: a byte-level BPE we train ourselves, and Qwen2-style files from a directory.

Every tokenizer exposes the same six special tokens by role (bos, eos, pad, boi, eoi, image)
so layout and inference never care which vocabulary is underneath. Byte-level BPE means any
string encodes (no unknown tokens), which matters for user prompts with odd characters.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from tapestry.errors import TapestryError

TOKENIZER_FILE = "tokenizer.json"
SPECIALS_FILE = "tokenizer_specials.json"


@dataclass(frozen=True)
class SpecialTokens:
    """The literal strings of the special tokens, by role."""

    bos: str = "<|bos|>"
    eos: str = "<|eos|>"
    pad: str = "<|pad|>"
    boi: str = "<|boi|>"  # begin of image: the model emits it to decide an image comes next
    eoi: str = "<|eoi|>"
    image: str = "<|image|>"  # placeholder id for positions an image's embeddings fill

    def all(self) -> list[str]:
        return [self.bos, self.eos, self.pad, self.boi, self.eoi, self.image]


# Qwen2 / Qwen2.5-VL / BAGEL vocabularies already hold tokens for these roles.
QWEN2_SPECIALS = SpecialTokens(
    bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>",
    boi="<|vision_start|>", eoi="<|vision_end|>", image="<|image_pad|>",
)


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the ids of the special tokens by role."""

    def __init__(self, backend, specials: SpecialTokens = SpecialTokens()):
        self.backend = backend
        self.specials = specials
        missing = [t for t in specials.all() if backend.token_to_id(t) is None]
        if missing:
            raise TapestryError(f"tokenizer lacks special token(s) {', '.join(missing)}")
        self.bos_id, self.eos_id, self.pad_id, self.boi_id, self.eoi_id, self.image_id = (
            backend.token_to_id(t) for t in specials.all())

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, without adding any special token (layout places those)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def save(self, directory: str | os.PathLike) -> None:
        from tapestry.atomic import atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / TOKENIZER_FILE, self.backend.to_str())
        atomic_write_text(directory / SPECIALS_FILE, json.dumps(asdict(self.specials), indent=1))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "TextTokenizer":
        """Our own directory (tokenizer.json + tokenizer_specials.json) or a Qwen2-style one
        (tokenizer.json, or vocab.json + merges.txt)."""
        directory = Path(directory)
        specials_path = directory / SPECIALS_FILE
        backend = _qwen2_backend(directory)
        if specials_path.is_file():
            specials = SpecialTokens(**json.loads(specials_path.read_text()))
        elif backend.token_to_id(QWEN2_SPECIALS.boi) is not None:
            specials = QWEN2_SPECIALS
        else:
            specials = SpecialTokens()
        return cls(backend, specials)


def _qwen2_backend(directory: Path):
    """The `tokenizers.Tokenizer` of a folder: tokenizer.json, else vocab.json + merges.txt."""
    from tokenizers import Tokenizer

    try:
        if (directory / TOKENIZER_FILE).is_file():
            return Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            return _qwen2_from_vocab_merges(directory)
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions on bad files
        raise TapestryError(f"{directory}: cannot read tokenizer: {e}") from None
    raise TapestryError(f"{directory}: no tokenizer found (expected {TOKENIZER_FILE}, or vocab.json + merges.txt)")


def _qwen2_from_vocab_merges(directory: Path):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    merges = []
    for line in (directory / "merges.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#version"):
            left, right = line.split(" ")
            merges.append((left, right))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        added = sorted(config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))
        backend.add_special_tokens([AddedToken(v["content"], special=True) for _, v in added])
    return backend


def train_bpe(
    texts: Iterable[str], vocab_size: int = 2048, specials: SpecialTokens = SpecialTokens()
) -> TextTokenizer:
    """Train a byte-level BPE on `texts` (deterministic for the same texts and size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials.all(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(backend, specials)


def general_english(max_chars: int = 2_000_000) -> list[str]:
    """English prose available offline: the docstrings of Python's standard library.

    Not literature, but varied enough that a tokenizer trained on it plus ToyWorld phrasing does
    not shatter ordinary user prompts into single bytes.
    """
    import importlib
    import inspect
    import pkgutil

    names = sorted(m.name for m in pkgutil.iter_modules() if not m.name.startswith("_"))
    texts: list[str] = []
    total = 0
    for name in names:
        if name in {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}:
            continue
        try:
            module = importlib.import_module(name) if name in _STDLIB_PROSE else None
        except Exception:  # noqa: BLE001 - an optional module that fails to import is skipped
            module = None
        if module is None:
            continue
        for obj in [module] + [getattr(module, a, None) for a in sorted(dir(module))]:
            doc = inspect.getdoc(obj) if obj is not None else None
            if doc and len(doc) > 80:
                texts.append(doc)
                total += len(doc)
                if total >= max_chars:
                    return texts
    return texts


# Stdlib modules with long English docstrings and no side effects on import.
_STDLIB_PROSE = {
    "argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email", "enum", "fractions", "functools", "heapq", "http", "inspect",
    "io", "itertools", "json", "logging", "os", "pathlib", "pickle", "queue", "random", "re",
    "shutil", "socket", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
    "typing", "unittest", "urllib", "uuid", "warnings", "zipfile",
}
