"""Throughput of the backup stream pipeline alone: compress+encrypt and decrypt+decompress.

``python -m bench.backup_stream [--size-mib 256] [--level 3] [--threads 0]`` generates a mixed
input in memory first (a third incompressible random bytes, a third low-entropy text-like bytes,
a third sparse pages that are mostly zeros), so generating it is not timed. It then times, on
the same input: ``seal_stream`` (zstd + AES-256-GCM + SHA-256), ``open_stream`` of the result
with its checksum, ``verify_stream``, and as the reference the same zstd settings without
encryption or hashing. Rates are MB/s (10^6 bytes) of raw (uncompressed) data per second of wall
time; the pipeline phases also show MB per CPU-second (all threads), which a busy machine
disturbs less. Nothing is written to disk; the stored stream is kept in memory between phases.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import sys
import time

from coffer.backup import open_stream, seal_stream, verify_stream
from coffer.backup._zstd import CompressionParameter, ZstdCompressor, ZstdDecompressor
from coffer.bus.keys import generate_key

_MIB = 1 << 20
# Most byte values become a space or one of a few letters: about 3 bits of entropy per byte.
_TEXTLIKE = bytes(b" etaoinshrdlu"[i % 13] if i < 208 else i for i in range(256))


def mixed_blocks(size: int) -> list[bytes]:
    """``size`` bytes in 1 MiB blocks cycling through three kinds of content."""
    blocks = []
    for index in range((size + _MIB - 1) // _MIB):
        length = min(_MIB, size - index * _MIB)
        kind = index % 3
        if kind == 0:
            block = os.urandom(length)
        elif kind == 1:
            block = os.urandom(length).translate(_TEXTLIKE)
        else:
            page = bytearray(16384)
            pages = bytearray()
            while len(pages) < length:
                page[:512] = os.urandom(512)
                pages += page
            block = bytes(pages[:length])
        blocks.append(block)
    return blocks


def _cpu_seconds() -> float:
    """CPU time of this process, all threads (zstd's workers included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rate(size: int, seconds: float) -> float:
    return size / seconds / 1e6 if seconds > 0 else float("inf")


def _zstd_only(blocks: list[bytes], level: int, threads: int) -> tuple[float, float]:
    options: dict[int, int] = {
        CompressionParameter.compression_level: level,
        CompressionParameter.nb_workers: threads or len(os.sched_getaffinity(0)),
        CompressionParameter.checksum_flag: 1,
    }
    started = time.perf_counter()
    compressor = ZstdCompressor(options=options)
    frames = [compressor.compress(block) for block in blocks]
    frames.append(compressor.flush(ZstdCompressor.FLUSH_FRAME))
    # zstd refuses repeated calls that make no progress, which empty inputs are.
    frames = [frame for frame in frames if frame]
    compress_seconds = time.perf_counter() - started
    started = time.perf_counter()
    decompressor = ZstdDecompressor()
    for frame in frames:
        data = frame
        while True:
            decompressor.decompress(data, _MIB)
            data = b""
            if decompressor.eof or decompressor.needs_input:
                break
    return compress_seconds, time.perf_counter() - started


def _median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256, help="input size in MiB")
    parser.add_argument("--level", type=int, default=3, help="zstd level")
    parser.add_argument("--threads", type=int, default=0, help="zstd workers, 0 = one per CPU")
    parser.add_argument("--chunk-size", type=int, default=_MIB, help="encrypted chunk size")
    parser.add_argument("--repeat", type=int, default=3, help="runs per phase; medians shown")
    args = parser.parse_args(argv)
    size = args.size_mib * _MIB

    print(f"generating {args.size_mib} MiB of mixed input ...", file=sys.stderr)
    blocks = mixed_blocks(size)
    master = generate_key()
    timings: dict[str, list[float]] = {
        "seal": [],
        "open": [],
        "verify": [],
        "zstd_compress": [],
        "zstd_decompress": [],
    }
    cpu: dict[str, list[float]] = {"seal": [], "open": []}
    for _ in range(max(1, args.repeat)):
        started, cpu_started = time.perf_counter(), _cpu_seconds()
        stored_iter, info_of = seal_stream(
            iter(blocks),
            master,
            "bench-backup",
            level=args.level,
            threads=args.threads,
            chunk_size=args.chunk_size,
        )
        stored = list(stored_iter)
        timings["seal"].append(time.perf_counter() - started)
        cpu["seal"].append(_cpu_seconds() - cpu_started)
        info = info_of()

        started, cpu_started = time.perf_counter(), _cpu_seconds()
        restored = 0
        for piece in open_stream(stored, master, "bench-backup", info.wrapped_key, info.checksum):
            restored += len(piece)
        timings["open"].append(time.perf_counter() - started)
        cpu["open"].append(_cpu_seconds() - cpu_started)

        started = time.perf_counter()
        verify_stream(stored, master, "bench-backup", info.wrapped_key, info.checksum)
        timings["verify"].append(time.perf_counter() - started)

        compress_seconds, decompress_seconds = _zstd_only(blocks, args.level, args.threads)
        timings["zstd_compress"].append(compress_seconds)
        timings["zstd_decompress"].append(decompress_seconds)

    # Correctness, untimed: the bytes that come back are the bytes that went in.
    source_digest = hashlib.sha256()
    for block in blocks:
        source_digest.update(block)
    restored_digest = hashlib.sha256()
    for piece in open_stream(stored, master, "bench-backup", info.wrapped_key, info.checksum):
        restored_digest.update(piece)
    if restored != size or restored_digest.digest() != source_digest.digest():
        print("FAILED: the restored bytes differ from the input", file=sys.stderr)
        return 1
    del stored
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def rate(phase: str) -> float:
        return _rate(size, _median(timings[phase]))

    workers = args.threads or len(os.sched_getaffinity(0))
    print(
        f"backup stream, {args.size_mib} MiB mixed input, zstd level {args.level}, "
        f"{workers} zstd workers, {os.cpu_count()} CPUs, chunk {args.chunk_size} bytes, "
        f"median of {max(1, args.repeat)} runs, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"  stored size            {info.size / 1e6:10.1f} MB (ratio {info.size / size:.3f})")
    print(
        f"  compress+encrypt+hash  {rate('seal'):10.1f} MB/s"
        f"   ({_rate(size, _median(cpu['seal'])):.1f} MB per CPU-second)"
    )
    print(
        f"  decrypt+decompress     {rate('open'):10.1f} MB/s"
        f"   ({_rate(size, _median(cpu['open'])):.1f} MB per CPU-second)"
    )
    print(f"  verify (full pass)     {rate('verify'):10.1f} MB/s")
    print(f"  zstd alone, compress   {rate('zstd_compress'):10.1f} MB/s")
    print(f"  zstd alone, decompress {rate('zstd_decompress'):10.1f} MB/s")
    print(f"  peak RSS (incl. input) {peak_mib:10.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
