"""``premoe`` command line: subcommands map 1:1 onto :mod:`premoe.api` functions.

Where each verb's code is:

* :mod:`premoe.cli.offline`: ``calibrate``, ``refit``, ``prune``, ``eval``, ``inspect``, ``sweep``, ``demo``
* :mod:`premoe.cli.serving`: ``route``, ``generate``, ``chat``, ``serve``
* :mod:`premoe.cli.flags`: flags several verbs share
"""

from __future__ import annotations

import argparse
import logging
import sys

from premoe._version import __version__
from premoe.cli.offline import PARSERS as OFFLINE_PARSERS, run as run_offline
from premoe.cli.serving import PARSERS as SERVING_PARSERS, run as run_serving
from premoe.cli.flags import DENSE_METRICS, SCORER_NAMES, SERVE_POLICIES
from premoe.errors import PremoeError

__all__ = ["main", "build_parser", "DENSE_METRICS", "SCORER_NAMES", "SERVE_POLICIES"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="premoe", description="Task-specific MoE expert pruning and retrieval (PreMoe).")
    ap.add_argument("--version", action="version", version=f"premoe {__version__}")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in ("calibrate", "refit", "prune", "eval", "inspect", "route", "generate", "chat", "serve", "sweep", "demo"):
        (SERVING_PARSERS.get(verb) or OFFLINE_PARSERS[verb])(sub)
    return ap


def _run(args) -> int:
    return (run_serving if args.command in SERVING_PARSERS else run_offline)(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="premoe: %(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # premoe shows its own progress; transformers' per-load bars are noise
    if args.quiet:
        import os

        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        return _run(args)
    except PremoeError as e:
        print(f"premoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("premoe: interrupted; nothing was written", file=sys.stderr)
        return 130
