"""Bounded inflation of Deflated transfer syntax data sets (PS3.5 A.5), for the node and workers.

A deflated data set can expand a thousandfold: a 1 MB C-STORE may inflate to a gigabyte. Every
inflation aidx does (receiving, and reading a stored file before handing it to pydicom, which
inflates without a bound) stops at the configured maximum data set size.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

# pydicom's own reader of the File Meta Information group (it inflates the data set after it
# without a bound, so the data set is read here).
from pydicom.filereader import _read_file_meta_info, read_preamble

# Transfer syntaxes whose data set is deflated (PS3.5 A.5; JPIP Referenced Deflate variants).
DEFLATED_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.205"}
)
_CHUNK = 1 << 20


class InflateLimitError(ValueError):
    """The data set inflates past the limit; ``limit`` is the number of bytes allowed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the deflated data set inflates past {limit} bytes")
        self.limit = limit


def inflate(data: bytes | memoryview, limit: int) -> bytearray:
    """Inflate raw deflate ``data`` in chunks; raises InflateLimitError past ``limit`` bytes
    (never holding much more than ``limit`` of output) and zlib.error for a broken stream."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    pending: bytes | memoryview = data
    while pending:
        out += inflater.decompress(pending, _CHUNK)
        if len(out) > limit:
            raise InflateLimitError(limit)
        pending = inflater.unconsumed_tail
        if inflater.eof:
            break
    out += inflater.flush()
    if len(out) > limit:
        raise InflateLimitError(limit)
    return out


def inflated_size(path: Path, limit: int) -> int | None:
    """The inflated size of a stored Part 10 file's data set when its transfer syntax is
    deflated (None otherwise), counted in chunks without keeping the output; raises
    InflateLimitError past ``limit``."""
    with path.open("rb") as fp:
        read_preamble(fp, force=True)
        meta = _read_file_meta_info(fp)
        syntax = str(meta.get("TransferSyntaxUID", ""))
        if syntax not in DEFLATED_SYNTAXES:
            return None
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while chunk := fp.read(_CHUNK):
            data = chunk
            while data:
                out = inflater.decompress(data, _CHUNK)
                total += len(out)
                if total > limit:
                    raise InflateLimitError(limit)
                data = inflater.unconsumed_tail
        return total + len(inflater.flush())


def read_header(path: Path, limit: int, **kwargs: Any) -> Dataset:
    """``dcmread(path, stop_before_pixels=True, **kwargs)`` of a stored file, after checking
    that a deflated data set does not inflate past ``limit`` (InflateLimitError)."""
    inflated_size(path, limit)
    return dcmread(path, stop_before_pixels=True, **kwargs)
