"""Everyday English sentences from Debian's fortune cookie packages, for the sentence embedders' training split.

``fortunes`` and ``fortunes-min`` (sayings, jokes, quotations, definitions; the offensive set is another
package and is not read) are downloaded with apt-get and unpacked, never installed. Each cookie's lines
are cut into sentences; kept are plain prose sentences of a few words (no verse, no attribution, no
code or markup, no shouting), each once. Measured on the distillation benchmark (#18, MiniLM with half
its MLP channels removed, then distilled on 4,000 sentences): the worst eval sentence's cosine went
0.752 -> 0.857 against Python's own prose (pydoc topics), the older training text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from realmodels import _export

PACKAGES = ("fortunes", "fortunes-min")
INSIDE = Path("usr/share/games/fortunes")
SKIPPED_FILES = frozenset({"art", "ascii-art"})  # pictures drawn in characters, not prose
# A sentence of plain prose: a capital first, plain characters, a closing stop (the pydoc fallback uses it too)
PROSE = re.compile(r"[A-Z][A-Za-z0-9 ,;:'\"()-]+[a-z)][.!?]")
_ODD_CHARACTERS = re.compile(r"[{}<>\[\]|\\#$@=_*^~`/]")
_SENTENCE_END = re.compile(r"[.!?][\"')]?\s*$")


def sentences(folder: Path, words: tuple[int, int], held: set[str]) -> tuple[list[str], str]:
    """Every usable sentence of the packages (unpacked under ``folder``), in file-name order, with
    ``words[0]``-``words[1]`` words, none in ``held`` (case and spacing aside); and where they came from."""
    roots = _export.unpacked(list(PACKAGES), folder)
    files = [path for root, _ in roots.values() for path in (root / INSIDE).iterdir()
             if path.suffix not in (".dat", ".u8") and not path.is_symlink() and path.name not in SKIPPED_FILES]
    versions = ", ".join(f"{package} {version}" for package, (_, version) in sorted(roots.items()))
    return sentences_in(files, words, held), f"Debian {versions}: /{INSIDE}"


def sentences_in(files: list[Path], words: tuple[int, int], held: set[str]) -> list[str]:
    """The usable sentences of these fortune files, in file-name order (see :func:`sentences`)."""
    held_keys = {_key(s) for s in held}
    kept: list[str] = []
    seen: set[str] = set()
    for path in sorted(files, key=lambda path: path.name):
        for cookie in _cookies(path):
            for sentence in _cookie_sentences(cookie):
                key = _key(sentence)
                if words[0] <= len(sentence.split()) <= words[1] and _plain(sentence) and sentence not in held and key not in held_keys \
                        and key not in seen:
                    seen.add(key)
                    kept.append(sentence)
    return kept


def _key(sentence: str) -> str:
    return " ".join(sentence.lower().split())


def _cookies(path: Path) -> Iterator[list[str]]:
    """A fortune file's cookies (separated by lines holding only '%'), as lists of lines."""
    cookie: list[str] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip() == "%":
            if cookie:
                yield cookie
            cookie = []
        else:
            cookie.append(line)
    if cookie:
        yield cookie


def _prose_line(line: str) -> bool:
    """A line of running text: no tabs, control or non-ASCII characters, markup or code, not
    indented (verse, dialogue, quoted code), not mostly capitals, not an attribution ('-- ...')."""
    if "\t" in line or not line.strip() or line.lstrip().startswith("--") or line.startswith("    "):
        return False
    if any(ord(c) < 32 or ord(c) > 126 for c in line) or _ODD_CHARACTERS.search(line):
        return False
    letters = [c for c in line if c.isalpha()]
    return not letters or sum(c.isupper() for c in letters) / len(letters) <= 0.3


def _paragraphs(cookie: list[str]) -> list[tuple[str, bool]]:
    """Runs of prose lines joined, each with whether it starts where a sentence may start (the
    cookie's start, or after a line that ended one)."""
    found: list[tuple[str, bool]] = []
    run: list[str] = []
    starts_clean = previous_ended = True
    for line in cookie:
        if line.lstrip().startswith("--"):  # the attribution, and nothing of the cookie after it
            break
        if _prose_line(line):
            if not run:
                starts_clean = previous_ended
            run.append(line)
            previous_ended = bool(_SENTENCE_END.search(line))
            continue
        if run:
            found.append((" ".join(" ".join(run).split()), starts_clean))
            run = []
        previous_ended = bool(_SENTENCE_END.search(line)) or not line.strip()
    if run:
        found.append((" ".join(" ".join(run).split()), starts_clean))
    return found


def _cookie_sentences(cookie: list[str]) -> Iterator[str]:
    for text, starts_clean in _paragraphs(cookie):
        parts = re.split(r"(?<=[.!?])\s+", text)
        yield from (part.strip() for part in (parts if starts_clean else parts[1:]))


def _plain(sentence: str) -> bool:
    """A sentence of plain prose: capital first, a closing stop, balanced quotes, few capitals."""
    if PROSE.fullmatch(sentence) is None or "--" in sentence or sentence.count('"') % 2:
        return False
    letters = [c for c in sentence if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) <= 0.2
