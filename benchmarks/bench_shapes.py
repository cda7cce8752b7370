"""Shapes generator benchmark: cost per image drawn one at a time vs in a loader-sized batch.

    python benchmarks/bench_shapes.py                  # 64x64 images, batches of 64, one torch thread
    python benchmarks/bench_shapes.py --threads 2 --image-size 32

The DataLoader asks ``ShapesDataset.__getitems__`` for a whole batch, which draws
each sample's random numbers from its own generator and renders the batch in
one set of tensor ops; ``dataset[i]`` renders a batch of one. Both run
interleaved in one process (median of --repeats), and the printed RATIO is
per-image time one at a time / batched.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sp_lightning.data import ShapesDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = ShapesDataset(args.batch * (args.repeats + 1), image_size=args.image_size)
    data.__getitems__(range(args.batch))  # warm-up
    single, batched = [], []
    for r in range(1, args.repeats + 1):
        indices = range(r * args.batch, (r + 1) * args.batch)
        start = time.perf_counter()
        for i in indices:
            data[i]
        single.append((time.perf_counter() - start) / args.batch)
        start = time.perf_counter()
        data.__getitems__(indices)
        batched.append((time.perf_counter() - start) / args.batch)
    one, many = statistics.median(single), statistics.median(batched)
    print(f"{args.image_size}x{args.image_size} images, batch {args.batch}, {args.threads} thread(s), median of {args.repeats}")
    print(f"  one at a time: {one * 1e3:.2f} ms/image   batched: {many * 1e3:.2f} ms/image")
    print(f"RATIO one-at-a-time / batched: {one / many:.2f}")


if __name__ == "__main__":
    main()
