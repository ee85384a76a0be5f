"""The broken-input corpus: every hostile or damaged input through every command that reads adapters.

The corpus (tests/helpers/broken_inputs.py, generated in code) covers damaged headers, huge
numbers, NaN and infinities, deep nesting, wrong types in PEFT configs, catastrophic regular
expressions, FIFOs/sockets/devices, terminal escapes and markup, names that are not UTF-8 or near
the file-name limit, and files every operation refuses. Each input goes through inspect,
convert, merge, resize, add, scan, verify and show, in this process, each run with a time limit.
A run fails when it hangs, crashes (traceback, internal error), prints a stray warning or raw
escape sequence, exits non-zero with anything but one error line, fails on a valid input,
leaves something in its output folder, writes an output lorareg cannot read back, or changes
its input. Prints every failure, then ``inputs tried / failures``.

    .venv/bin/python benchmarks/broken_inputs.py [--limit 20] [--only NAME,NAME]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=float, default=20.0, help="seconds each command may run")
    parser.add_argument("--only", help="comma-separated case names")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="lorareg-corpus-") as work:
        # Nothing of the user's: a fresh catalog, an offline Hub, one torch thread.
        os.environ.update(LORAREG_HOME=str(Path(work) / "home"), HF_HOME=str(Path(work) / "hf"), HF_HUB_OFFLINE="1",
                          OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        os.environ.pop("LORAREG_DEBUG", None)
        from tests.helpers.broken_inputs import CASES, in_process_runner, run_corpus

        cases = [c for c in CASES if not args.only or c.name in args.only.split(",")]

        def show(item, failures) -> None:
            for failure in failures:
                print(f"FAIL {failure}"[:400], flush=True)

        report = run_corpus(in_process_runner(), Path(work) / "runs", cases, limit=args.limit, progress=show)
    failing = len({f.case for f in report.failures})
    print(f"{report.cases} inputs tried / {failing} failures ({report.runs} command runs, "
          f"{len(report.failures)} failed checks, {report.seconds:.0f} s)")
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
