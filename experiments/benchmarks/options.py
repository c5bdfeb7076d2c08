"""Command-line options of the benchmarks that time named sections: rounds, CPU threads, the allocator setting,
which sections to run."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from lightning_modules.training.cpu_allocator import ALLOCATOR_MODES, configure_cpu_allocator


def machine_parser(doc: str | None, repeats: int) -> argparse.ArgumentParser:
    """A parser with ``--repeats`` (default ``repeats``), ``--threads`` and ``--cpu-allocator``; the benchmark adds
    its own options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds (medians)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (W1: 2)")
    parser.add_argument("--cpu-allocator", choices=ALLOCATOR_MODES, default="retain",
                        help="glibc allocator setting, as `headprune --cpu_allocator` (default: retain freed memory)")
    return parser


def sectioned_parser(doc: str | None, sections: dict[str, Callable], repeats: int) -> argparse.ArgumentParser:
    """`machine_parser` with ``--sections`` (comma-separated names of ``sections``)."""
    parser = machine_parser(doc, repeats)
    parser.add_argument("--sections", default=",".join(sections), help=f"comma-separated, of {list(sections)}")
    return parser


def apply_machine_options(args: argparse.Namespace) -> dict:
    """Set the allocator and the thread count as ``args`` ask; returns them as the fields every figure carries."""
    configure_cpu_allocator(args.cpu_allocator)
    torch.set_num_threads(args.threads)
    return {"threads": torch.get_num_threads(), "cpu_allocator": args.cpu_allocator}


def chosen_sections(args: argparse.Namespace, sections: dict[str, Callable]) -> list[Callable]:
    """The sections ``--sections`` names, in its order; an unknown name exits with the list to choose from."""
    names = args.sections.split(",")
    unknown = [name for name in names if name not in sections]
    if unknown:
        raise SystemExit(f"unknown section {unknown[0]!r}; choose from {list(sections)}")
    return [sections[name] for name in names]
