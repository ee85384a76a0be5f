"""Where a first scan's CPU goes, per file: reading, hashing, fingerprinting, and each SQL statement.

In one process, on ``--files`` small kohya LoRA files (tests/helpers/small_loras.py, as in
scan_folder.py): the CPU time per file (``time.process_time``, steadier than wall time on a shared
machine) of the header read and index, of hashing, of the fingerprint, of ``FileFacts.row``, and of
storing the rows in a fresh catalog in batches of 200, with the time of each kind of SQL statement.

``--compare SRC`` instead times whole in-process first scans with ``--workers N`` under this
checkout's sources and under those of SRC (a folder holding another version's ``loralib``,
``registry``, ``cli``, ``lorareg``, ``web``, e.g. from ``git archive main``), alternating, each in a
new process: the scanning process's CPU per file, the wall time and the CPU of all processes.

    .venv/bin/python benchmarks/scan_phases.py [--files 3000]
    .venv/bin/python benchmarks/scan_phases.py --files 3000 --compare /tmp/main-src --workers 2 --rounds 2
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run in a child process: point the editable install's packages at SRC, then scan in-process.
CHILD = """
import sys, time
src, root, folder, workers, home = sys.argv[1:6]
import __editable___lorareg_0_1_0_finder as finder
for key in list(finder.MAPPING):
    finder.MAPPING[key] = finder.MAPPING[key].replace(root, src)
from lorareg.registry.catalog import Catalog
import lorareg.registry.scan as scan_module
assert scan_module.__file__.startswith(src), scan_module.__file__
with Catalog(home) as catalog:
    catalog.by_name("x")
    cpu, wall = time.process_time(), time.perf_counter()
    report = scan_module.scan(catalog, folder, workers=int(workers))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
print(cpu / report.found * 1e3, wall, report.added)
"""


def phases(paths: list[str]) -> None:
    from loralib.formats import identify_inputs, index_inputs, open_inputs
    from loralib.inspection import inspect
    from lorareg.registry.catalog import Catalog
    from lorareg.registry.describe import describe

    def per_file(label: str, fn) -> None:
        start = time.process_time()
        for path in paths:
            fn(path)
        print(f"{label}: {(time.process_time() - start) / len(paths) * 1e3:.3f} ms per file", flush=True)

    def indexed(path: str) -> None:
        inputs = open_inputs(path, allow_pickle=False)
        index_inputs(inputs, identify_inputs(inputs))

    per_file("header read and format detection (open_inputs + identify_inputs)",
             lambda p: identify_inputs(open_inputs(p, allow_pickle=False)))
    per_file("  + module index (index_inputs)", indexed)
    per_file("inspect, no hashes, no fingerprint", lambda p: inspect(p, hashes=False, fingerprint=False))
    per_file("inspect with hashes", lambda p: inspect(p, hashes=True, fingerprint=False))
    per_file("describe (inspect with hashes and fingerprint)", describe)
    per_file("describe(...).row()", lambda p: describe(p).row())
    rows = [describe(p).row() for p in paths]
    seconds: collections.Counter = collections.Counter()

    class Timed:
        def __init__(self, conn) -> None:
            self.conn = conn

        def execute(self, sql, *args):
            start = time.perf_counter()
            try:
                return self.conn.execute(sql, *args)
            finally:
                seconds[" ".join(sql.split()[:3])] += time.perf_counter() - start

        def __getattr__(self, name):
            return getattr(self.conn, name)

    with Catalog(tempfile.mkdtemp(prefix="lorareg-phases-")) as catalog:
        catalog.by_name("x")  # create the schema first
        catalog.conn = Timed(catalog.conn)
        start = time.process_time()
        for i in range(0, len(rows), 200):
            catalog.add_many(rows[i:i + 200])
        print(f"store rows in batches of 200: {(time.process_time() - start) / len(rows) * 1e3:.3f} ms per file CPU")
    for statement, total in seconds.most_common(8):
        print(f"  {statement}…: {total / len(rows) * 1e3:.3f} ms per file (wall)")


def compare(folder: Path, src: Path, workers: int, rounds: int) -> None:
    trees = {"this checkout": ROOT, str(src): src}
    for round_ in range(rounds):
        for name in list(trees) if round_ % 2 == 0 else list(trees)[::-1]:
            home = tempfile.mkdtemp(prefix="lorareg-phases-")
            child = subprocess.Popen([sys.executable, "-c", CHILD, str(trees[name]), str(ROOT), str(folder),
                                      str(workers), home], stdout=subprocess.PIPE, text=True)
            _, _, usage = os.wait4(child.pid, 0)
            ms, wall, added = child.stdout.read().split()
            print(f"{name}, --workers {workers}: scanning process {float(ms):.3f} ms per file, wall {float(wall):.2f} s, "
                  f"CPU of all processes {usage.ru_utime + usage.ru_stime:.2f} s, added {added} "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lorareg-bench")
    parser.add_argument("--compare", type=Path, help="another version's source folder")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.scan_folder import build

    folder = args.cache / f"scan{args.files}"
    build(folder, args.files)
    print(f"{os.cpu_count()} cores; load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.compare:
        compare(folder, args.compare.resolve(), args.workers, args.rounds)
    else:
        phases(sorted(str(p) for p in folder.iterdir()))


if __name__ == "__main__":
    main()
