"""Every benchmark script in bench/ answers --help: it imports, parses its arguments and says what it measures."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py")
MEMORY = ["moe", "dense", "dense-refit", "moe-refit"]  # bench/memory.py's subcommands, each with its own options


def test_every_script_is_listed_in_the_bench_readme():
    readme = (BENCH / "README.md").read_text()
    assert SCRIPTS and all(f"`{name}`" in readme for name in SCRIPTS), SCRIPTS


@pytest.mark.parametrize("argv", [[n] for n in SCRIPTS] + [["memory.py", sub] for sub in MEMORY], ids=" ".join)
def test_help(argv):
    r = subprocess.run(
        [sys.executable, str(BENCH / argv[0]), *argv[1:], "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=BENCH.parent,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"usage: {' '.join(argv)}"), r.stdout[:200]
    purpose = r.stdout.split("\n\n")[1]  # the description's first paragraph: what the script measures
    assert len(purpose.split()) >= 8, r.stdout[:500]
    assert not purpose.lstrip().startswith(("-", "options:", "positional")), r.stdout[:500]
