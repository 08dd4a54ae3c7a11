#!/usr/bin/env python3
"""Shows whether this machine stalls every process while fdatasync runs under CPU load.

Runs, for a second each, (1) a busy loop alone, (2) an fdatasync loop alone, and
(3) both at once, and prints every gap longer than 3 ms the busy loop saw and every
fdatasync longer than 4 ms. On the development VM case (3) shows 12-20 ms gaps in
*both* processes about every 100 ms (vmstat reports steal time meanwhile), while (1)
and (2) show none or one: latency percentiles of anything that fsyncs under load are
bounded by these stalls, whatever the engine does.

    python3 benches/tools/fsync_stalls.py [directory for the scratch file]
"""

import multiprocessing
import os
import sys
import tempfile
import time

SECONDS = 1.0


def busy(label, out):
    start = last = time.perf_counter()
    gaps = []
    while last - start < SECONDS:
        now = time.perf_counter()
        if now - last > 0.003:
            gaps.append((round((last - start) * 1000), round((now - last) * 1000, 1)))
        last = now
    out.put((label, "busy-loop gaps (at ms, lasting ms)", gaps))


def syncing(label, path, out):
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    start = time.perf_counter()
    slow, count = [], 0
    while time.perf_counter() - start < SECONDS:
        os.write(fd, b"x" * 300)
        before = time.perf_counter()
        os.fdatasync(fd)
        took = time.perf_counter() - before
        count += 1
        if took > 0.004:
            slow.append((round((before - start) * 1000), round(took * 1000, 1)))
    os.close(fd)
    out.put((label, f"slow fdatasyncs of {count} (at ms, lasting ms)", slow))


def run(label, busy_loop, fsync_loop, path):
    out = multiprocessing.Queue()
    procs = []
    if busy_loop:
        procs.append(multiprocessing.Process(target=busy, args=(label, out)))
    if fsync_loop:
        procs.append(multiprocessing.Process(target=syncing, args=(label, path, out)))
    for p in procs:
        p.start()
    for _ in procs:
        who, what, items = out.get()
        print(f"{who}: {what}: {items}")
    for p in procs:
        p.join()


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else None
    with tempfile.TemporaryDirectory(dir=directory) as d:
        path = os.path.join(d, "scratch")
        run("busy loop alone", True, False, path)
        run("fdatasync loop alone", False, True, path)
        run("both at once", True, True, path)


if __name__ == "__main__":
    main()
