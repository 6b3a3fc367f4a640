"""Text data for the language-model pipeline: a built-in offline corpus or the user's files.

Tokens are bytes (256 symbols): nothing to learn, nothing to download, and the shipped
model needs no tokenizer file (the report says ``tokenizer: bytes``). Documents are split
into train / validation / test whole, so no test window shares a document with training;
each split is cut into fixed-length windows of ``context + 1`` tokens (inputs and the
next-token targets).

The built-in corpus is the source of a fixed list of Python standard-library modules: it
is on every machine that runs Python. Its sha256 and size go into the report, since a
different Python patch release has slightly different source.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeqat.errors import UserError

VOCAB = 256  # byte-level tokens

# Pure-Python modules present in every CPython 3.11+ (no tests, no generated tables).
STDLIB_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "code", "codecs", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "difflib", "dis", "enum", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq",
    "hmac", "imaplib", "inspect", "ipaddress", "locale", "logging", "mailbox", "netrc",
    "numbers", "operator", "optparse", "pathlib", "pickle", "pprint", "queue", "random",
    "shlex", "shutil", "smtplib", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing",
    "uuid", "warnings", "weakref", "zipimport",
)
BUILTIN = "python-stdlib"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".toml", ".json", ".csv", ".html", ".c",
                 ".h", ".js", ".tex", ".yaml", ".yml", ".cfg", ".ini", ".sh")


@dataclass(frozen=True)
class Corpus:
    """Documents as bytes, in a fixed order, with where they came from."""

    name: str
    documents: tuple[tuple[str, bytes], ...] = field(repr=False)

    @property
    def size(self) -> int:
        return sum(len(d) for _, d in self.documents)

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for name, doc in self.documents:
            h.update(name.encode() + b"\0" + doc + b"\0")
        return h.hexdigest()


def stdlib_corpus() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for module in STDLIB_MODULES:
        found = [p for p in (root / f"{module}.py", root / module / "__init__.py")
                 if p.is_file()]
        if not found:
            raise UserError(f"data.path is empty, so the built-in corpus is read, but the "
                            f"standard-library module {module!r} has no .py source in "
                            f"{root}; set data.path to a text file or folder")
        docs.append((f"{module}.py", found[0].read_bytes()))
    return Corpus(BUILTIN, tuple(docs))


def _decode_check(path: Path, raw: bytes) -> None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r});"
                        " convert it to UTF-8 or leave it out of data.path") from None


def user_corpus(path: str | Path, pieces: int = 64) -> Corpus:
    """A UTF-8 text file or a folder of them (every text-suffixed file, recursively).

    A single file is cut into ``pieces`` contiguous documents so it can be split by
    document like a folder.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"data.path {p}: no such file or folder; name a UTF-8 text file or a "
                        "folder of text files")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"data.path {p}: no text files ({', '.join(TEXT_SUFFIXES[:5])}, "
                            "...) in this folder")
        docs = []
        for f in files:
            raw = f.read_bytes()
            _decode_check(f, raw)
            if raw:
                docs.append((str(f.relative_to(p)), raw))
    else:
        raw = p.read_bytes()
        _decode_check(p, raw)
        step = -(-len(raw) // pieces) if raw else 0
        docs = [(f"{p.name}[{i}]", raw[i * step:(i + 1) * step]) for i in range(pieces)
                if raw[i * step:(i + 1) * step]]
    if sum(len(d) for _, d in docs) == 0:
        raise UserError(f"data.path {p}: the text is empty; give at least a few kilobytes")
    return Corpus(str(p), tuple(docs))


@dataclass(frozen=True)
class TextData:
    """Windows of byte tokens per split: int32 arrays of shape (N, context + 1)."""

    corpus: Corpus = field(repr=False)
    context: int
    train: np.ndarray = field(repr=False)
    val: np.ndarray = field(repr=False)
    test: np.ndarray = field(repr=False)
    split_documents: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"name": "text", "corpus": self.corpus.name, "sha256": self.corpus.sha256,
                "bytes": self.corpus.size, "documents": len(self.corpus.documents),
                "tokenizer": "bytes", "vocab": VOCAB, "context": self.context,
                "windows": {"train": len(self.train), "validation": len(self.val),
                            "test": len(self.test)},
                "split_documents": self.split_documents}


def _windows(docs: list[bytes], length: int) -> np.ndarray:
    stream = np.frombuffer(b"\n".join(docs), np.uint8).astype(np.int32)
    n = len(stream) // length
    return stream[: n * length].reshape(n, length)


def load_text(path: str | None, context: int, *, every: int = 10) -> TextData:
    """Reads the corpus and cuts it into windows; document ``i`` goes to test when
    ``i % every == 0``, to validation when ``i % every == every // 2``, else to train.

    Raises:
      UserError: a missing, empty or non-UTF-8 corpus, or one too small for a window of
        ``context + 1`` tokens in every split.
    """
    corpus = user_corpus(path) if path else stdlib_corpus()
    splits: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    names: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i, (name, doc) in enumerate(corpus.documents):
        split = "test" if i % every == 0 else "val" if i % every == every // 2 else "train"
        splits[split].append(doc)
        names[split].append(name)
    if not splits["val"] or not splits["test"]:  # fewer documents than one of each split
        raise UserError(f"data.path {corpus.name}: {len(corpus.documents)} document(s); "
                        f"at least {every // 2 + 1} are needed to split by document (give "
                        "a folder of more files, or a larger file)")
    arrays = {k: _windows(v, context + 1) for k, v in splits.items()}
    for k, a in arrays.items():
        if len(a) == 0:
            have = sum(len(d) for d in splits[k])
            raise UserError(f"data.path {corpus.name}: the {k} split has {have} bytes, fewer "
                            f"than one window of lm.context + 1 = {context + 1} tokens; "
                            "lower lm.context or give more text")
    return TextData(corpus, context, arrays["train"], arrays["val"], arrays["test"],
                    {"validation": names["val"], "test": names["test"]})


def encode(text: str) -> np.ndarray:
    """Byte tokens of ``text`` (UTF-8)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(tokens) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")
