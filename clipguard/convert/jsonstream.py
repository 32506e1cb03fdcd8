"""Yield the items of a top-level JSON array one at a time.

Visual Genome's region_descriptions.json is about 700 MB; ``json.load`` would hold all of it
(several GB as Python objects). This reads it in chunks and decodes one array item at a time, so
memory stays at one chunk plus one item (one image's regions, a few KB).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from clipguard.convert.sources import ConvertError

CHUNK_CHARS = 1 << 20
MAX_ITEM_CHARS = 64 << 20
_WHITESPACE = " \t\n\r"


class _Buffer:
    def __init__(self, handle, chunk_chars: int):
        self.handle = handle
        self.chunk_chars = chunk_chars
        self.text = ""
        self.pos = 0
        self.eof = False

    def more(self, at_least: int | None = None) -> bool:
        """Drop what was consumed and read another chunk; False at the end of the file."""
        if self.eof:
            return False
        chunk = self.handle.read(max(self.chunk_chars, at_least or 0))
        self.text = self.text[self.pos:] + chunk
        self.pos = 0
        self.eof = not chunk
        return bool(chunk)

    def next_char(self) -> str | None:
        """The next non-whitespace character (not consumed), or None at the end of the file."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return None


def iter_json_array(path: Path, what: str, chunk_chars: int = CHUNK_CHARS) -> Iterator[Any]:
    """Items of the JSON array in ``path``; ConvertError when the file is not such an array.
    ``what`` names the expected items in messages ("images with regions")."""
    decoder = json.JSONDecoder()
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise ConvertError(f"cannot read {path}: {exc}") from exc
    with handle:
        buffer = _Buffer(handle, chunk_chars)
        try:
            first = buffer.next_char()
            if first != "[":
                found = "an empty file" if first is None else repr(buffer.text[buffer.pos:buffer.pos + 30])
                raise ConvertError(f"{path} should be a JSON array of {what}, but it starts with {found}")
            buffer.pos += 1
            if buffer.next_char() == "]":
                return
            while True:
                yield _decode_item(buffer, decoder, path, what)
                separator = buffer.next_char()
                if separator == "]":
                    return
                if separator != ",":
                    raise ConvertError(f"{path} is not valid JSON: expected ',' or ']' after an item of {what}, "
                                       f"found {'the end of the file' if separator is None else repr(separator)}")
                buffer.pos += 1
        except UnicodeDecodeError as exc:
            raise ConvertError(f"{path} is not UTF-8 text: {exc}") from exc


def _decode_item(buffer: _Buffer, decoder: json.JSONDecoder, path: Path, what: str) -> Any:
    if buffer.next_char() is None:
        raise ConvertError(f"{path} ends in the middle of the array of {what} (truncated download?)")
    while True:
        try:
            item, end = decoder.raw_decode(buffer.text, buffer.pos)
        except json.JSONDecodeError as exc:
            # An item cut by the chunk edge fails too: read on, and only call it broken at the end.
            if len(buffer.text) - buffer.pos > MAX_ITEM_CHARS:
                raise ConvertError(f"{path}: one item of {what} is over {MAX_ITEM_CHARS} characters; "
                                   "is this the right file?") from exc
            if not buffer.more(at_least=len(buffer.text) - buffer.pos):
                raise ConvertError(f"{path} is not valid JSON ({exc.msg}) in the array of {what} "
                                   "(truncated download?)") from exc
            continue
        # A number at the chunk edge can decode short ("12" of "123"); items here are objects,
        # which end with "}" and so are complete once decoded.
        if not isinstance(item, dict):
            raise ConvertError(f"{path} should be a JSON array of {what} (objects), but holds {type(item).__name__} items")
        buffer.pos = end
        return item
