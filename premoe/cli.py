"""The ``premoe`` command: one subcommand per module of :mod:`premoe.verbs`, named after it.

Each verb module holds its parser (``add_parser``), what it prints (``run``) and the Python function the
flags feed (``premoe calibrate`` is :func:`premoe.verbs.calibrate.calibrate`, also ``premoe.calibrate``).
Verb modules import torch only when they run, so ``premoe --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import import_module

from premoe._version import __version__
from premoe.errors import PremoeError

VERBS = ("calibrate", "refit", "prune", "eval", "inspect", "route", "generate", "chat", "serve", "sweep", "demo")
DATA_PARALLEL = (
    "calibrate",
    "refit",
    "prune",
    "eval",
    "sweep",
)  # verbs that run data-parallel under torchrun (premoe.core.distributed)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="premoe",
        description="Task-specific pruning of MoE experts (PreMoe) and of "
        "dense heads and channels (SEAP), with task routing.",
    )
    ap.add_argument("--version", action="version", version=f"premoe {__version__}")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS:
        import_module(f"premoe.verbs.{verb}").add_parser(sub)
    return ap


def _verb_parser(ap: argparse.ArgumentParser, verb: str) -> argparse.ArgumentParser | None:
    for action in ap._actions:  # argparse keeps no public map of its subparsers
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(verb)
    return None


def main(argv: list[str] | None = None) -> int:
    import os

    from premoe.core.options import cli_message

    # Before torch loads OpenMP: waiting worker threads spin briefly, then sleep. With more runnable threads than
    # cores (another premoe, a test run), libgomp's default long spin stalls every small parallel op. Re-fitting
    # the shipped model's kept experts, idle / beside another premoe process on 2 cores: default spin 4.6 s /
    # 43 s, 3000 spins 5.6 s / 10.7 s, OMP_WAIT_POLICY=PASSIVE 9.4 s / 6.9 s.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "3000")

    from premoe.core import distributed

    ap = build_parser()
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    if distributed.launched():
        if args.command not in DATA_PARALLEL:
            print(
                f"premoe: error: `premoe {args.command}` does not run under torchrun (data-parallel verbs: "
                f"{', '.join(DATA_PARALLEL)}); run it as one process",
                file=sys.stderr,
            )
            return 2
        args.quiet = args.quiet or rank != 0  # progress and log lines from rank 0 only
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="premoe: %(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.quiet:
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # premoe shows its own progress; transformers' per-load bars are noise
        distributed.world()  # under torchrun: join the process group before any work
        code = import_module(f"premoe.verbs.{args.command}").run(args)
        distributed.close()
        return code
    except PremoeError as e:
        where = f" (rank {rank})" if distributed.launched() else ""
        print(f"premoe: error{where}: {cli_message(str(e), _verb_parser(ap, args.command))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("premoe: interrupted; nothing was written", file=sys.stderr)
        return 130
