"""Text cmcd hands to people and their tools: CSV no spreadsheet runs, lines no control character forges.

Two rules, each written once and used by every door (cmcctl, the HTTP API and its console, the
daemon's log):

- CSV: every CSV cmcd writes goes through CsvWriter. A text cell starting with = + - @ TAB or
  CR is one a spreadsheet may run as a formula (OWASP "CSV injection"), so it gets a single
  quote in front; the reader sees the text with a visible ' and nothing runs. Numbers stay
  numbers (a number cannot carry a formula). Lists become one cell, comma-joined. Control
  characters in a cell are escaped as in a log line: a CSV is also read with cat and grep,
  where a quoted CR LF would show a row that is not one.
- Lines: escape_controls() makes C0 and C1 control characters, DEL, the Unicode line and
  paragraph separators and undecodable bytes (lone surrogates from surrogateescape) visible as
  \\r \\n \\t \\x00 \\x85 \\u2028 \\udcff, so text a client chose (an AUTH login name, a remote
  reply) can neither start a new line in a table or log nor send a terminal escape sequence.

Never opens a file or a socket: callers hand it the stream to write to.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from typing import IO, Any

#: a cell starting with one of these is read as a formula by Excel, LibreOffice or Google Sheets
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")

#: characters that are control characters for refusing input (C0, DEL, C1, U+2028/2029)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: characters escaped on output: the controls and lone surrogates (bytes that were not UTF-8)
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def has_controls(text: str) -> bool:
    """True if TEXT holds a control character (C0, DEL, C1, a Unicode line or paragraph separator)."""
    return _CONTROL.search(text) is not None


def _escape_one(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def escape_controls(text: str) -> str:
    """TEXT with every control character and undecodable byte shown as an escape (\\r \\n \\x00 \\u2028)."""
    return _UNPRINTABLE.sub(_escape_one, text)


def csv_cell(value: Any) -> Any:
    """VALUE as a CSV cell a spreadsheet will not run: None is empty, a list is comma-joined,
    control characters are escaped, and text starting with = + - @ TAB or CR gets a single
    quote in front."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str):
        return value
    if value.startswith(FORMULA_STARTS):
        value = "'" + value
    return escape_controls(value)


class CsvWriter:
    """The one CSV writer: RFC 4180 rows (CRLF, quoted where needed), every cell through csv_cell."""

    def __init__(self, out: IO[str]) -> None:
        self._writer = csv.writer(out, lineterminator="\r\n")

    def writerow(self, cells: Iterable[Any]) -> None:
        self._writer.writerow([csv_cell(c) for c in cells])
