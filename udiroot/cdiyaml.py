"""The YAML that ``nvidia-ctk cdi generate`` writes, read without PyYAML.

``shifter`` runs under ``python3 -I -S`` (no site-packages), so a CDI spec in YAML is read
here: block mappings and sequences by indentation (a sequence may sit at its key's
indent), ``- key: value`` items, plain, single- and double-quoted scalars, flow
sequences of scalars (``[ro, nosuid]``), ``{}``/``[]``, comments and a ``---`` start.
Plain scalars become ``int`` (decimal), ``bool`` (``true``/``false``), ``None``
(``null``, ``~``, empty) or ``str``, as YAML's core schema has them. Anything else (anchors,
aliases, tags, block scalars ``|``/``>``, flow mappings with content, multiple documents)
is refused with :class:`SpecSyntaxError`: such a spec can be written as JSON instead
(``nvidia-ctk cdi generate --format=json``). ``tests/test_gpu_rules.py`` checks that this
reader and PyYAML agree on what it accepts.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class SpecSyntaxError(ValueError):
    """YAML outside the subset; the message names the line."""


_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "/": "/", "0": "\0", "r": "\r"}


def _strip_comment(text: str) -> str:
    """The line without a trailing ``# comment`` (a ``#`` after a blank, outside quotes)."""
    if "#" not in text:
        return text.rstrip()  # most lines: no character loop
    quote = ""
    for i, c in enumerate(text):
        if quote:
            if c == quote:
                quote = ""
            elif c == "\\" and quote == '"':
                continue
        elif c in "\"'" and (i == 0 or text[i - 1] in " [,:-"):
            quote = c
        elif c == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip()
    return text.rstrip()


def _scalar(text: str, line: int) -> Any:
    text = text.strip()
    if text[:1] == '"':
        if len(text) < 2 or not text.endswith('"'):
            raise SpecSyntaxError(f"line {line}: unterminated string")
        out, i, body = [], 0, text[1:-1]
        while i < len(body):
            c = body[i]
            if c == "\\":
                if i + 1 >= len(body) or body[i + 1] not in _ESCAPES:
                    raise SpecSyntaxError(f"line {line}: unsupported escape")
                out.append(_ESCAPES[body[i + 1]])
                i += 2
                continue
            if c == '"':
                raise SpecSyntaxError(f"line {line}: stray quote")
            out.append(c)
            i += 1
        return "".join(out)
    if text[:1] == "'":
        if len(text) < 2 or not text.endswith("'") or "'" in text[1:-1].replace("''", ""):
            raise SpecSyntaxError(f"line {line}: unterminated string")
        return text[1:-1].replace("''", "'")
    if text == "{}":
        return {}
    if text[:1] == "[":
        if not text.endswith("]") or "[" in text[1:] or "{" in text:
            raise SpecSyntaxError(f"line {line}: only flat flow sequences are supported")
        inner = text[1:-1].strip()
        return [] if not inner else [_scalar(p, line) for p in inner.split(",")]
    if text[:1] in ("&", "*", "!", "|", ">", "{", "%", "@", "`", "?") or text.startswith("- "):
        raise SpecSyntaxError(f"line {line}: unsupported YAML ({text[:20]})")
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    digits = text[1:] if text[:1] in "+-" else text
    if digits.isdigit() and digits.isascii():
        if digits[0] == "0" and digits != "0":  # octal in YAML 1.1, decimal in 1.2
            raise SpecSyntaxError(f"line {line}: ambiguous number {text} (quote it)")
        return int(text)
    if ": " in text or text.endswith(":"):
        raise SpecSyntaxError(f"line {line}: a mapping where a value was expected")
    return text


def _split_key(content: str, line: int) -> tuple[str, str] | None:
    """``key: rest`` → (key, rest); None when the content is not a mapping entry."""
    if content[:1] in "\"'":
        end = content.find(content[0], 1)
        if end < 0 or content[end + 1 : end + 2] != ":":
            return None
        key, rest = _scalar(content[: end + 1], line), content[end + 2 :]
    else:
        at = content.find(": ")
        if at < 0 and content.endswith(":"):
            at = len(content) - 1
        if at <= 0:
            return None
        key, rest = content[:at], content[at + 1 :]
    if rest and rest[0] not in " \t":
        return None
    return str(key), rest.strip()


class _Reader:
    def __init__(self, text: str) -> None:
        self.lines: list[tuple[int, str, int]] = []  # (indent, content, line number)
        started = False
        for number, raw in enumerate(text.splitlines(), 1):
            if "\t" in raw[: len(raw) - len(raw.lstrip())]:
                raise SpecSyntaxError(f"line {number}: tab in indentation")
            content = _strip_comment(raw)
            if not content.strip():
                continue
            if content.strip() == "---" and not started and not self.lines:
                started = True
                continue
            if content.startswith(("---", "...", "%")):
                raise SpecSyntaxError(f"line {number}: more than one document")
            self.lines.append((len(content) - len(content.lstrip()), content.strip(), number))
        self.pos = 0

    def block(self, indent: int) -> Any:
        ind, content, _ = self.lines[self.pos]
        if content == "-" or content.startswith("- "):
            return self.sequence(ind)
        return self.mapping(ind)

    def sequence(self, indent: int) -> list[Any]:
        out: list[Any] = []
        while self.pos < len(self.lines):
            ind, content, number = self.lines[self.pos]
            if ind != indent or not (content == "-" or content.startswith("- ")):
                if ind > indent:
                    raise SpecSyntaxError(f"line {number}: bad indentation")
                break
            rest = content[1:].lstrip()
            if not rest:
                self.pos += 1
                out.append(self.nested(indent, number))
            elif _split_key(rest, number) is not None:
                # "- key: value": a mapping whose keys sit where "key" starts.
                self.lines[self.pos] = (indent + len(content) - len(rest), rest, number)
                out.append(self.mapping(indent + len(content) - len(rest)))
            else:
                self.pos += 1
                out.append(_scalar(rest, number))
        return out

    def nested(self, indent: int, number: int, seq_ok: bool = False) -> Any:
        """The block below a line ending in ``:`` or ``-`` (None when there is none)."""
        if self.pos >= len(self.lines):
            return None
        ind, content, _ = self.lines[self.pos]
        is_seq = content == "-" or content.startswith("- ")
        if ind > indent or (seq_ok and ind == indent and is_seq):
            return self.block(ind)
        return None

    def mapping(self, indent: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while self.pos < len(self.lines):
            ind, content, number = self.lines[self.pos]
            if ind != indent:
                if ind > indent:
                    raise SpecSyntaxError(f"line {number}: bad indentation")
                break
            entry = _split_key(content, number)
            if entry is None:
                if content == "-" or content.startswith("- "):
                    break
                raise SpecSyntaxError(f"line {number}: expected 'key: value'")
            key, rest = entry
            if key in out:
                raise SpecSyntaxError(f"line {number}: key {key} given twice")
            self.pos += 1
            out[key] = _scalar(rest, number) if rest else self.nested(indent, number, True)
        return out


def loads(text: str) -> Any:
    """The document of ``text`` (a mapping, sequence or scalar)."""
    reader = _Reader(text)
    if not reader.lines:
        return None
    if len(reader.lines) == 1 and _split_key(reader.lines[0][1], 1) is None and not (
            reader.lines[0][1].startswith("- ")):
        return _scalar(reader.lines[0][1], reader.lines[0][2])
    value = reader.block(reader.lines[0][0])
    if reader.pos != len(reader.lines):
        raise SpecSyntaxError(f"line {reader.lines[reader.pos][2]}: bad indentation")
    return value
