"""The `moekit` console script: thin argparse front-ends over the library.

Each subcommand lives in its own module under ``moekit/cli/`` and exposes
``add_parser(subparsers)`` (registers its flags, each with help text) and
``run(args) -> int`` (calls the library, returns the exit code). Modules are imported
lazily so ``moekit --help`` stays fast and a missing optional dependency of one
command does not break the others.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("moekit.cli.demo", "train a small byte-level MoE LM on CPU, show expert load, record a routing trace"),
    "plan": ("moekit.cli.plan", "plan expert placement (greedy / ILP) from routing traces and write placement.json"),
    "run": ("moekit.cli.run", "greedy generation with an HF MoE model whose experts are offloaded under a byte budget"),
    "simulate": ("moekit.cli.simulate", "replay a routing trace through the expert cache: hit rates per policy vs Belady"),
}


def version() -> str:
    """moekit's version: ``moekit.__version__``, which the build reads into the package
    metadata (pyproject: ``version = {attr = "moekit.__version__"}``)."""
    from moekit import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit",
        description="moekit: Mixture-of-Experts training and serving toolkit for PyTorch.",
        epilog="Run `moekit COMMAND --help` for the flags of one command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"moekit {version()}",
                        help="print moekit's version and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v: INFO, -vv: DEBUG)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:  # a command whose module is missing: say so, keep the rest
            p = sub.add_parser(name, help=f"{help_text} (unavailable: {exc})")
            p.set_defaults(_unavailable=str(exc))
            continue
        p = mod.add_parser(sub, name, help_text)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", None):
        print(f"moekit {args.command}: unavailable: {args._unavailable}", file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
