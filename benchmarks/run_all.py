"""Run the benchmark suite, print a table and write ``benchmarks/results.json``.

Usage: ``python benchmarks/run_all.py [--quick] [--only embed tcav ...] [--markdown]``

Each ``bench_<name>.py`` exposes ``run(quick: bool) -> list[Figure]``. ``--quick`` uses small
sizes (a smoke test of the suite, not figures to quote). ``--markdown`` also prints the table as
Markdown for the README.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import Figure, machine, write_json  # noqa: E402

BENCHMARKS = ("embed", "tcav", "nmf", "net2vec", "similarity", "memory", "controls", "decode", "ray")


def table(figures: list[Figure], markdown: bool = False) -> str:
    rows = [("benchmark", "figure", "value", "target", "met")]
    for f in figures:
        value = f"{f.value:.2f} {f.unit}" if f.unit == "×" else f"{f.value:.3g} {f.unit}"
        met = "—" if f.passed is None else ("yes" if f.passed else "NO")
        rows.append((f.benchmark, f.name, value, f.target or "—", met))
    if markdown:
        cells = [[cell.replace("|", "\\|") for cell in row] for row in rows]
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: check that the suite runs")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results.json"))
    args = parser.parse_args()

    facts = machine()
    figures: list[Figure] = []
    seconds = {}
    for name in args.only or BENCHMARKS:
        started = time.perf_counter()
        module = importlib.import_module(f"bench_{name}")
        found = module.run(quick=args.quick)
        seconds[name] = round(time.perf_counter() - started, 1)
        figures.extend(found)
        print(table(found).split("\n", 1)[1], flush=True)
    print()
    print(table(figures))
    if args.markdown:
        print()
        print(table(figures, markdown=True))
    write_json(Path(args.out), {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick, "machine": facts,
        "seconds": seconds, "figures": [f.to_dict() for f in figures],
    })
    print(f"\nresults in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
