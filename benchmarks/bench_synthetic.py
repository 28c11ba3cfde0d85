"""Rendering speed of the synthetic concept world on one CPU core.

Usage: ``python benchmarks/bench_synthetic.py [--n 2000] [--seed 0] [--size 96 128]``

Prints scenes (images with all their masks and boxes) per second for ``render_scene`` and for
``SyntheticWorld.image`` + ``masks`` (which render once through the scene cache).
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import time  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="scenes per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("LOW", "HIGH"))
    parser.add_argument("--repeats", type=int, default=3, help="report the best of this many runs")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):  # pin to one core
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    from conceptlens.concepts.data.synthetic import SyntheticWorld, render_scene

    size = tuple(args.size)
    for index in range(50):  # warm up
        render_scene(args.seed + 1, index, size)

    best = 0.0
    for repeat in range(args.repeats):
        start = time.perf_counter()
        for index in range(args.n):
            render_scene(args.seed, repeat * args.n + index, size)
        best = max(best, args.n / (time.perf_counter() - start))
    print(f"render_scene: {best:.0f} scenes/s on one core (size {size[0]}-{size[1]} px, best of {args.repeats})")

    world = SyntheticWorld(n_images=args.n, seed=args.seed + 2, size_range=size)
    start = time.perf_counter()
    for index in range(args.n):
        world.image(index)
        world.masks(index)
    rate = args.n / (time.perf_counter() - start)
    print(f"SyntheticWorld.image + masks: {rate:.0f} images/s on one core")


if __name__ == "__main__":
    main()
