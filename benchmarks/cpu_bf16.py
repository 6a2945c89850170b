"""bf16 autocast against fp32 on this CPU: one Conv3d forward + backward at a localizer's width.

    OMP_NUM_THREADS=1 python benchmarks/cpu_bf16.py [--repeats 3]

On CPUs without native bf16 (no AVX-512 BF16 / AMX) PyTorch's bf16 convolutions run far slower than
fp32, so ``optim.amp: bf16`` (``two_stage.yaml``, meant for a GPU) should become
``optim.amp=none`` when training on such a CPU. Prints the CPU capability torch detected and the
median seconds of each.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def _seconds(amp: bool, repeats: int) -> float:
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(16, 16, 3, padding=1)
    x = torch.randn(1, 16, 16, 64, 64, requires_grad=True)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = conv(x)
        y.float().sum().backward()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    fp32, bf16 = _seconds(False, args.repeats), _seconds(True, args.repeats)
    print(
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} "
        f"thread(s), load average {os.getloadavg()[0]:.2f}: Conv3d 16->16 at 16 x 64 x 64, "
        f"forward + backward: fp32 {fp32:.3f} s, bf16 autocast {bf16:.3f} s ({bf16 / fp32:.1f}x)"
    )


if __name__ == "__main__":
    main()
