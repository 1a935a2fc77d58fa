"""Codec throughput: encode/decode GB/s of 1/10/100 MB tensors next to a plain bytes copy.

All figures come from this one run, so the ratio column compares like with like.
    python benchmarks/codec.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import codec


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(sizes_mb: tuple[int, ...] = (1, 10, 100), repeat: int = 5) -> list[dict]:
    rows = []
    for mb in sizes_mb:
        tensor = torch.randn(mb * 1024 * 1024 // 4)
        raw = tensor.numpy().tobytes()
        nbytes = len(raw)
        wire = codec.encode({"w": tensor})
        t_copy = best_of(lambda r=raw: bytearray(r), repeat)
        t_enc = best_of(lambda t=tensor: codec.encode({"w": t}), repeat)
        t_dec = best_of(lambda w=wire: codec.decode(w), repeat)
        assert torch.equal(codec.decode(wire)["w"], tensor)
        gb = nbytes / 1e9
        rows.append({"mb": mb, "copy_gb_s": gb / t_copy, "encode_gb_s": gb / t_enc, "decode_gb_s": gb / t_dec,
                     "encode_vs_copy": t_enc / t_copy, "decode_vs_copy": t_dec / t_copy})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"{'size':>7} {'copy GB/s':>10} {'encode GB/s':>12} {'decode GB/s':>12} {'enc/copy':>9} {'dec/copy':>9}")
    for r in measure(repeat=args.repeat):
        print(f"{r['mb']:>5}MB {r['copy_gb_s']:>10.2f} {r['encode_gb_s']:>12.2f} {r['decode_gb_s']:>12.2f} "
              f"{r['encode_vs_copy']:>8.2f}x {r['decode_vs_copy']:>8.2f}x")


if __name__ == "__main__":
    main()
