#!/usr/bin/env python3
"""What one group commit's write and fdatasync cost on this disk, by frame size and
by how the log's blocks were made.

For each frame size, writes 24 MiB of frames, each followed by fdatasync, to a file
whose blocks are (1) allocated with fallocate (as the store's segments are: unwritten
extents, which the first write turns into written ones through the journal), (2)
written with zeros and synced beforehand (as a reused or zero-filled segment would
be), (3) not allocated at all (a file that grows, as the plain-log baseline's does).
Prints the median and 99th percentile of fdatasync, and the rate of frames and bytes.

The 8-writer store bench keeps 1,024 writes in flight; with one group syncing while
the next one gathers, a group holds at most about half of them: about 160 KB of
256-byte puts. Whatever the store does besides the write and the sync, its rate is
at most (group size / the time of one such write and sync).

    python3 benches/tools/sync_cost.py [directory for the scratch file]
"""

import os
import sys
import tempfile
import time

TOTAL = 24 << 20
SIZES = [40 << 10, 160 << 10, 320 << 10]
KINDS = ["fallocated", "zero-filled", "growing"]


def prepare(path, kind):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    if kind == "fallocated":
        os.posix_fallocate(fd, 0, TOTAL)
    elif kind == "zero-filled":
        zeros = bytes(1 << 20)
        for offset in range(0, TOTAL, len(zeros)):
            os.pwrite(fd, zeros, offset)
    os.fsync(fd)
    return fd


def measure(path, kind, size):
    fd = prepare(path, kind)
    frame = b"x" * size
    syncs = []
    start = time.perf_counter()
    for offset in range(0, TOTAL - size + 1, size):
        os.pwrite(fd, frame, offset)
        before = time.perf_counter()
        os.fdatasync(fd)
        syncs.append(time.perf_counter() - before)
    elapsed = time.perf_counter() - start
    os.close(fd)
    os.unlink(path)
    syncs.sort()
    p50 = syncs[len(syncs) // 2] * 1e6
    p99 = syncs[min(len(syncs) - 1, len(syncs) * 99 // 100)] * 1e6
    return p50, p99, len(syncs) / elapsed, len(syncs) * size / elapsed / 1e6


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir()
    path = os.path.join(directory, "sync_cost.scratch")
    print(f"{'frame':>7} {'blocks':>12} {'fdatasync p50':>14} {'p99':>8} {'frames/s':>9} {'MB/s':>7}")
    for size in SIZES:
        for kind in KINDS:
            p50, p99, rate, mbs = measure(path, kind, size)
            print(f"{size >> 10:>5} K {kind:>12} {p50:>11.0f} us {p99:>5.0f} us {rate:>9.0f} {mbs:>7.1f}")


if __name__ == "__main__":
    main()
