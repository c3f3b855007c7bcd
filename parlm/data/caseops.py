"""CaseOps (PR #1729): a lossless case-operator text transform applied before SentencePiece.

`encode` lowercases text and records the case it removed with four reserved operator
characters (Private Use Area code points, reserved as user-defined pieces of the tokenizer),
so that "The", "the" and "THE" share one lexical piece:

    TITLE   + w   a word whose first character is its only capital:  "The"    -> TITLE "the"
    ALLCAPS + w   a word of two or more characters, all capitals:    "NASA"   -> ALLCAPS "nasa"
    CAPNEXT + c   each capital of any other word (mixed case):       "iPhone" -> "i" CAPNEXT "phone"
    ESC     + o   an operator character o that occurs in the text itself

A word is a maximal run of word characters (WORD_CHARACTERS: Unicode letters and non-decimal
numerals; not digits, underscore or combining marks). Only *case-invertible* capitals are
lowered: c with l = c.lower() one word character, l != c and l.upper() == c. Every other
character ('ß', 'İ', 'ǅ', the Kelvin sign, ...) is kept as it is, which is what makes the
transform lossless: decode uppercases exactly the characters the operators mark, and for
those l.upper() == c by construction. decode(encode(x)) == x for every string x.

BPB stays counted in the original text's bytes: `original_byte_weights` gives, for each
character of the transformed text, the UTF-8 bytes of the original text it stands for
(0 for an operator), from which the dataset build writes the per-token byte sidecar.
Both directions work on NumPy arrays of code points with per-code-point lookup tables.
"""
from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass

import numpy as np

TITLE = "\ue001"  # the next character is the first letter, and only capital, of its word
ALLCAPS = "\ue002"  # every character of the next word is a capital
CAPNEXT = "\ue003"  # the next character is a capital (mixed-case words)
ESC = "\ue004"  # the next character is an operator character of the original text
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
TRANSFORMS = ("none", "caseops")
WORD_CHARACTERS = r"[^\W\d_]"  # letters and non-decimal numerals (isalnum minus decimal digits)

_TITLE, _ALLCAPS, _CAPNEXT, _ESC = (ord(o) for o in OPERATORS)


class CaseOpsError(ValueError):
    """decode got text that no encode produces (a dangling or misplaced operator)."""


def is_invertible_capital(character: str) -> bool:
    """True when encode lowers `character`: l = character.lower() is one word character,
    l != character and l.upper() == character."""
    lower = character.lower()
    return (len(lower) == 1 and lower != character and lower.upper() == character
            and re.fullmatch(WORD_CHARACTERS, lower) is not None)


@dataclass(frozen=True)
class _Tables:
    is_word: np.ndarray  # bool per code point
    is_capital: np.ndarray  # bool: is_invertible_capital
    lower: np.ndarray  # uint32: the lowered code point of an invertible capital, else itself
    upper: np.ndarray  # uint32: the capital of a lowered invertible capital, else itself
    is_operator: np.ndarray  # bool


@functools.lru_cache(maxsize=1)
def _tables() -> _Tables:
    size = sys.maxunicode + 1
    characters = "".join(chr(c) for c in range(size) if not 0xD800 <= c < 0xE000)
    codepoints = np.frombuffer(characters.encode("utf-32-le"), dtype="<u4")
    is_word = np.zeros(size, dtype=bool)
    is_word[codepoints[[m.start() for m in re.finditer(WORD_CHARACTERS, characters)]]] = True
    lower = np.arange(size, dtype=np.uint32)
    upper = np.arange(size, dtype=np.uint32)
    is_capital = np.zeros(size, dtype=bool)
    for code in np.flatnonzero(is_word):
        character = chr(code)
        if is_invertible_capital(character):
            is_capital[code] = True
            lower[code] = ord(character.lower())
            upper[ord(character.lower())] = code
    is_operator = np.zeros(size, dtype=bool)
    is_operator[[_TITLE, _ALLCAPS, _CAPNEXT, _ESC]] = True
    return _Tables(is_word, is_capital, lower, upper, is_operator)


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4").copy()


def _text(codepoints: np.ndarray) -> str:
    return codepoints.astype("<u4").tobytes().decode("utf-32-le")


def _word_ids(is_word: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(word index per position (-1 outside words), word starts, word lengths)."""
    starts_mask = is_word & ~np.concatenate([[False], is_word[:-1]])
    starts = np.flatnonzero(starts_mask)
    ends = np.flatnonzero(is_word & ~np.concatenate([is_word[1:], [False]])) + 1
    ids = np.where(is_word, np.cumsum(starts_mask) - 1, -1)
    return ids, starts, ends - starts


def encode(text: str) -> str:
    """The CaseOps form of `text` (module docstring): ESC before every operator character,
    then per word with invertible capitals: ALLCAPS (length >= 2, all capitals), else TITLE
    (the first character is the only capital), else CAPNEXT before each capital; capitals
    lowered."""
    tables = _tables()
    codepoints = _codepoints(text)
    capital = tables.is_capital[codepoints]
    escapes = np.flatnonzero(tables.is_operator[codepoints])
    if not capital.any() and not escapes.size:
        return text
    ids, starts, lengths = _word_ids(tables.is_word[codepoints])
    capitals_per_word = np.bincount(ids[capital], minlength=len(starts))
    cased = capitals_per_word > 0
    all_capitals = cased & (lengths >= 2) & (capitals_per_word == lengths)
    title = cased & ~all_capitals & (capitals_per_word == 1) & capital[starts]
    mixed = cased & ~all_capitals & ~title
    capnext = np.flatnonzero(capital & np.concatenate([mixed, [False]])[ids])  # ids == -1: outside words
    positions = np.concatenate([escapes, starts[all_capitals], starts[title], capnext])
    values = np.concatenate([np.full(len(escapes), _ESC), np.full(int(all_capitals.sum()), _ALLCAPS),
                             np.full(int(title.sum()), _TITLE), np.full(len(capnext), _CAPNEXT)])
    codepoints[capital] = tables.lower[codepoints[capital]]
    order = np.argsort(positions, kind="stable")
    return _text(np.insert(codepoints, positions[order], values[order].astype(np.uint32)))


def _operator_plan(codepoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(operator positions to drop, positions decode uppercases) of a CaseOps text; raises
    CaseOpsError for an operator with nothing valid to mark."""
    tables = _tables()
    operators = np.flatnonzero(tables.is_operator[codepoints])
    if not operators.size:
        return operators, operators
    kinds = codepoints[operators]
    if (kinds == _ESC).any():  # escapes are rare: resolve them in order
        keep, escaped_next = [], False
        for position, kind in zip(operators.tolist(), kinds.tolist()):
            if escaped_next:
                escaped_next = False
                continue
            keep.append(position)
            escaped_next = kind == _ESC
        if escaped_next:
            raise CaseOpsError(f"dangling CaseOps ESC at character {keep[-1]}: nothing follows it")
        operators = np.asarray(keep, dtype=np.int64)
        kinds = codepoints[operators]
    following = operators + 1
    if following.size and following[-1] >= len(codepoints):
        raise CaseOpsError(f"dangling CaseOps operator U+{int(kinds[-1]):04X} at the end of the text")
    marks = kinds != _ESC
    if (tables.is_operator[codepoints[following[marks]]]).any():
        bad = operators[marks][tables.is_operator[codepoints[following[marks]]]][0]
        raise CaseOpsError(f"CaseOps operator at character {bad} is followed by another operator")
    escaped = following[~marks]
    if not tables.is_operator[codepoints[escaped]].all():
        bad = operators[~marks][~tables.is_operator[codepoints[escaped]]][0]
        raise CaseOpsError(f"CaseOps ESC at character {bad} escapes a character that is no operator")
    upper = following[(kinds == _TITLE) | (kinds == _CAPNEXT)]
    allcaps = following[kinds == _ALLCAPS]
    if allcaps.size:
        is_word = tables.is_word[codepoints]
        if not is_word[allcaps].all():
            raise CaseOpsError("CaseOps ALLCAPS operator not followed by a word")
        ids, _, _ = _word_ids(is_word)
        upper = np.concatenate([upper, np.flatnonzero(np.isin(ids, ids[allcaps]))])
    return operators, upper


def decode(text: str) -> str:
    """Invert `encode`: ESC o -> o, TITLE/CAPNEXT c -> c.upper(), ALLCAPS w -> w.upper()
    (each character); CaseOpsError for text no encode produces."""
    codepoints = _codepoints(text)
    operators, upper = _operator_plan(codepoints)
    if not operators.size:
        return text
    codepoints[upper] = _tables().upper[codepoints[upper]]
    return _text(np.delete(codepoints, operators))


def apply(transform: str, text: str) -> str:
    """`text` under the named transform: "none" (identity) or "caseops" (`encode`)."""
    if transform == "none":
        return text
    if transform == "caseops":
        return encode(text)
    raise ValueError(f"unknown text_transform {transform!r}; expected one of {TRANSFORMS}")


def utf8_lengths(codepoints: np.ndarray) -> np.ndarray:
    """UTF-8 bytes of each code point (1-4), int64."""
    codepoints = np.asarray(codepoints)
    return (1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)).astype(np.int64)


def original_byte_weights(transformed: str, transform: str) -> np.ndarray:
    """int64 per character of `transformed`: the UTF-8 bytes of the original text it stands
    for, so weights.sum() == len(original.encode("utf-8")).

    "none": each character's own UTF-8 length. "caseops": 0 for an operator (an escaping
    ESC included), the UTF-8 length of c.upper() for a character c an operator marks, and
    the own length for everything else (an escaped operator character included)."""
    codepoints = _codepoints(transformed)
    weights = utf8_lengths(codepoints)
    if transform == "none":
        return weights
    if transform != "caseops":
        raise ValueError(f"unknown text_transform {transform!r}; expected one of {TRANSFORMS}")
    operators, upper = _operator_plan(codepoints)
    weights[upper] = utf8_lengths(_tables().upper[codepoints[upper]])
    weights[operators] = 0
    return weights
