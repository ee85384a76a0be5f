"""Benchmark: the same commands as whole processes under two or more source trees, alternating.

For "did this change make any command slower?": each command runs under every checkout in turn,
round after round, so a machine that gets busier or quieter during the run affects all of them
alike; the median of the rounds is compared. Every checkout gets its own copy of the inputs and
its own catalog (a newer lorareg may upgrade a catalog an older one cannot read).

    .venv/bin/python benchmarks/checkouts.py --checkout before=/work/base --checkout after=. --rounds 7

A checkout is a source tree of lorareg at any commit (``git worktree add /tmp/x COMMIT``); it runs
with this environment's Python and packages. Trees from before the ``lorareg`` package existed are
run through ``cli.main``; later ones need ``lorareg/cli`` and ``lorareg/registry`` to resolve from the
tree (as an installed package they are mapped there), which the script arranges with links in a
copy of the tree's ``lorareg`` folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CATALOG_FILES = 300  # small kohya files for scan/list/search/show


def launcher(tree: Path, shim: Path) -> tuple[list[str], dict[str, str]]:
    """The command prefix and environment that run ``lorareg`` from ``tree``."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    if not (tree / "lorareg").is_dir():
        env["PYTHONPATH"] = str(tree)
        return [sys.executable, "-c", "from cli.main import main; main()"], env
    package = shim / "lorareg"
    package.mkdir(parents=True)
    for item in (tree / "lorareg").iterdir():
        if item.is_file() and not item.is_symlink():
            shutil.copy2(item, package / item.name)
    for name in ("cli", "registry", "web"):
        if (tree / name).is_dir():
            (package / name).symlink_to(tree / name)
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(tree)])
    return [sys.executable, "-m", "lorareg"], env


def build_inputs(folder: Path, rank: int) -> None:
    """An SDXL-shaped kohya LoRA and a folder of small adapters, written with this tree's loralib."""
    import torch

    import loralib
    from loralib.base_model import full_size_layers
    from loralib.layers import select_layers
    from loralib.synthetic import random_adapter

    layers = select_layers(full_size_layers("sdxl"), attention=True, feed_forward=True, projections=True)
    adapter = random_adapter(layers, rank=rank, alpha=rank / 2, architecture="sdxl", dtype=torch.float16)
    loralib.save(adapter, folder / "sdxl.safetensors")
    small = dict(list(select_layers(full_size_layers("sd1"), attention=True).items())[:8])
    (folder / "loras").mkdir()
    for i in range(CATALOG_FILES):
        tiny = random_adapter(small, rank=4, alpha=2, architecture="sd1", seed=i)
        tiny.metadata["ss_tag_frequency"] = f'{{"img": {{"pixel art": {i % 7 + 1}, "neon castle": 2}}}}'
        loralib.save(tiny, folder / "loras" / f"style_{i:04d}.safetensors")


COMMANDS = [
    ("--help", ["--help"]),
    ("inspect --no-hash", ["inspect", "{in}/sdxl.safetensors", "--no-hash"]),
    ("inspect (hashes)", ["inspect", "{in}/sdxl.safetensors"]),
    ("convert kohya -> peft", ["convert", "{in}/sdxl.safetensors", "--to", "peft", "-o", "{out}/peft"]),
    ("convert peft -> kohya", ["convert", "{in}/peft_ref", "--to", "kohya", "-o", "{out}/back.safetensors"]),
    (f"scan {CATALOG_FILES} files (first)", ["scan", "{in}/loras"]),
    ("scan again (unchanged)", ["scan", "{in}/loras"]),
    ("list", ["list"]),
    ("search pixel", ["search", "pixel"]),
    ("show NAME", ["show", "style_0007"]),
]


def run(prefix: list[str], env: dict[str, str], args: list[str], inputs: Path, out: Path, home: Path) -> float:
    """Seconds one command takes as a process (outputs of the previous run removed, untimed)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    argv = [*prefix, "--home", str(home), *(a.format(**{"in": inputs, "out": out}) for a in args)]
    start = time.perf_counter()
    # In a neutral folder: Python puts the working folder first on the path, ahead of the checkout.
    done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=home.parent)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", action="append", required=True, metavar="NAME=PATH",
                        help="a source tree to run (repeatable; the first is the reference)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    trees = dict(item.split("=", 1) for item in args.checkout)
    work = Path(tempfile.mkdtemp(prefix="lorareg-checkouts-"))
    try:
        shared = work / "inputs"
        shared.mkdir()
        build_inputs(shared, args.rank)
        sides = {}
        for name, tree in trees.items():
            side = work / name
            shutil.copytree(shared, side / "in")
            prefix, env = launcher(Path(tree).resolve(), side / "shim")
            home = side / "home"
            run(prefix, env, ["convert", "{in}/sdxl.safetensors", "--to", "peft", "-o", "{in}/peft_ref"],
                side / "in", side / "out", side / "scratch")
            sides[name] = (prefix, env, side / "in", side / "out", home)
        print(f"load average at start: {os.getloadavg()[0]:.1f}; {args.rounds} rounds, median seconds")
        header = f"{'command':32}" + "".join(f"{name:>12}" for name in trees) + "".join(
            f"{name + ' / ' + next(iter(trees)):>22}" for name in list(trees)[1:])
        print(header)
        for label, command in COMMANDS:
            times: dict[str, list[float]] = {name: [] for name in trees}
            for round_ in range(args.rounds):
                order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
                for name in order:
                    prefix, env, inputs, out, home = sides[name]
                    if label.startswith("scan") and "first" in label:
                        shutil.rmtree(home, ignore_errors=True)
                    times[name].append(run(prefix, env, command, inputs, out, home))
            medians = {name: statistics.median(t) for name, t in times.items()}
            reference = medians[next(iter(trees))]
            print(f"{label:32}" + "".join(f"{medians[n]:12.3f}" for n in trees)
                  + "".join(f"{medians[n] / reference:22.2f}" for n in list(trees)[1:]), flush=True)
        print(f"load average at end: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
