"""zstd from the standard library (Python 3.14+) or its official backport, behind one name."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 14):
    from compression.zstd import CompressionParameter, ZstdCompressor, ZstdDecompressor, ZstdError
else:
    from backports.zstd import CompressionParameter, ZstdCompressor, ZstdDecompressor, ZstdError

__all__ = ["CompressionParameter", "ZstdCompressor", "ZstdDecompressor", "ZstdError"]
