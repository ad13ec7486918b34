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


def split_parts(body: bytes | bytearray, boundary: str) -> list[Part]:
    """The parts of a multipart body; raises MultipartError when there are none or the body is
    cut short (no closing delimiter)."""
    if not boundary or len(boundary) > 200:
        raise MultipartError("the Content-Type's boundary parameter is missing or too long")
    view = memoryview(body)
    dash = b"--" + boundary.encode("latin-1")
    delimiter = b"\r\n" + dash
    # The first delimiter may open the body without a line break before it.
    position = 0 if bytes(view[: len(dash)]) == dash else body.find(delimiter)
    if position < 0:
        raise MultipartError(f"no part delimited by the boundary {boundary!r}")
    position += len(dash) if position == 0 else len(delimiter)
    parts: list[Part] = []
    while True:
        if bytes(view[position : position + 2]) == b"--":
            break  # the close delimiter
        line_end = body.find(b"\r\n", position)  # transport padding, then the line break
        if line_end < 0:
            raise MultipartError("the body ends inside a delimiter line")
        headers_end = body.find(b"\r\n\r\n", line_end)
        if headers_end == line_end:  # a part without header fields
            headers_text = b""
            content_start = line_end + 4
        else:
            if headers_end < 0:
                raise MultipartError("a part's header fields do not end")
            headers_text = bytes(view[line_end + 2 : headers_end])
            content_start = headers_end + 4
        following = body.find(delimiter, content_start)
        if following < 0:
            raise MultipartError(
                f"part {len(parts) + 1} is not closed by a boundary: the body was cut short"
            )
        parts.append(Part(_headers(headers_text), view[content_start:following]))
        position = following + len(delimiter)
    if not parts:
        raise MultipartError("the multipart body has no parts")
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
