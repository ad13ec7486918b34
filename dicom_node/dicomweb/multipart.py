"""``multipart/related`` bodies (RFC 2387, as PS3.18 8.7 uses them): splitting a request's
body into its parts without copying them, and writing a response's parts one by one."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


class MultipartError(ValueError):
    """A body that is not the multipart message its Content-Type announces."""


@dataclass(frozen=True)
class MediaType:
    """A media type and its parameters (names in lower case, quotes removed)."""

    type: str
    params: dict[str, str]

    @classmethod
    def parse(cls, value: str) -> MediaType:
        head, *rest = _split_outside_quotes(value, ";")
        params = {}
        for item in rest:
            name, _, val = item.partition("=")
            if name.strip():
                params[name.strip().lower()] = val.strip().strip('"')
        return cls(head.strip().lower(), params)


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    out: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(char)
    out.append("".join(current))
    return out


def split_accept(value: str) -> list[MediaType]:
    """The media types of an Accept header, in the order given (q-values are not ranked)."""
    return [MediaType.parse(part) for part in _split_outside_quotes(value, ",") if part.strip()]


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]  # names in lower case
    body: memoryview

    @property
    def media_type(self) -> MediaType:
        return MediaType.parse(self.headers.get("content-type", ""))


class PartReader:
    """Splits a multipart body into its parts as the body's bytes arrive: :meth:`feed` returns
    the parts completed by a chunk, so that each can be handled while the rest arrives and only
    the part being received is held in memory."""

    MAX_LINE = 4096  # a delimiter line (with transport padding) or a part's header block

    def __init__(self, boundary: str) -> None:
        if not boundary or len(boundary) > 200:
            raise MultipartError("the Content-Type's boundary parameter is missing or too long")
        self._dash = b"--" + boundary.encode("latin-1")
        self._delimiter = b"\r\n" + self._dash
        self._buffer = bytearray()
        self._scan = 0  # where the search for the next delimiter resumes
        self._started = False
        self.done = False  # the close delimiter has arrived
        self.count = 0  # parts returned so far

    def feed(self, chunk: bytes) -> list[Part]:
        if self.done:
            return []  # the epilogue after the close delimiter is ignored
        self._buffer += chunk
        if not self._started and not self._start():
            return []
        parts = []
        while not self.done:
            part = self._next()
            if part is None:
                break
            parts.append(part)
        self.count += len(parts)
        return parts

    def close(self) -> None:
        """The body has ended: raise MultipartError unless it ended as a multipart body."""
        if not self._started:
            raise MultipartError(f"no part delimited by the boundary {self._dash[2:]!r}")
        if not self.done:
            raise MultipartError(
                f"the body was cut short after {self.count} complete parts (no close delimiter)"
            )
        if not self.count:
            raise MultipartError("the multipart body has no parts")

    def _start(self) -> bool:
        """Drop the preamble up to the first delimiter (which may open the body without a line
        break before it)."""
        buffer = self._buffer
        if buffer[: len(self._dash)] == self._dash:
            del buffer[: len(self._dash)]
        else:
            found = buffer.find(self._delimiter)
            if found < 0:
                keep = len(self._delimiter)
                if len(buffer) > keep:
                    del buffer[:-keep]  # preamble: only a delimiter's start is kept
                return False
            del buffer[: found + len(self._delimiter)]
        self._started = True
        self._scan = 0
        return True

    def _next(self) -> Part | None:
        """The part at the head of the buffer (which starts right after a delimiter), once its
        closing delimiter has arrived."""
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        if buffer[:2] == b"--":
            self.done = True
            return None
        line_end = buffer.find(b"\r\n", 0, self.MAX_LINE)
        if line_end < 0:
            if len(buffer) >= self.MAX_LINE:
                raise MultipartError("a delimiter line does not end")
            return None
        following = buffer.find(self._delimiter, max(self._scan, line_end))
        if following < 0:
            self._scan = max(len(buffer) - len(self._delimiter) + 1, 0)
            return None
        headers_end = buffer.find(b"\r\n\r\n", line_end, following + 2)
        if headers_end == line_end:
            headers, content_start = b"", line_end + 4
        elif headers_end < 0:
            raise MultipartError(f"the header fields of part {self.count + 1} do not end")
        else:
            headers, content_start = bytes(buffer[line_end + 2 : headers_end]), headers_end + 4
        with memoryview(buffer) as view:  # one copy of the content (released before del)
            content = bytes(view[content_start:following])
        part = Part(_headers(headers), memoryview(content))
        del buffer[: following + len(self._delimiter)]
        self._scan = 0
        return part


def split_parts(body: bytes | bytearray, boundary: str) -> list[Part]:
    """The parts of a whole multipart body; raises MultipartError when there are none or the
    body is cut short (no closing delimiter)."""
    reader = PartReader(boundary)
    parts = reader.feed(bytes(body))
    reader.close()
    return parts


def _headers(text: bytes) -> dict[str, str]:
    headers = {}
    for line in text.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def new_boundary() -> str:
    return uuid.uuid4().hex


def multipart_stream(
    parts: Iterable[tuple[str, Iterable[bytes]]], boundary: str
) -> Iterator[bytes]:
    """A multipart body, written part by part: ``parts`` are (content type, chunks of the
    part's content)."""
    for content_type, chunks in parts:
        yield f"\r\n--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode("latin-1")
        yield from chunks
    yield f"\r\n--{boundary}--\r\n".encode("latin-1")
