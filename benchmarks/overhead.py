"""Training-time overhead of repwatch on the demo SimSiam run, as a ratio measured in one run.

Runs the same seeded demo with and without the monitor, alternating, ``--repeats`` times each,
and prints the median wall time of each and their ratio. Absolute times depend on the machine;
quote the ratio, and name the device when quoting absolute GPU times.

    .venv/bin/python benchmarks/overhead.py --steps 300 --repeats 5 --every 10
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

from monitor.tools.demo import run_demo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    times: dict[bool, list[float]] = {False: [], True: []}
    run_demo(steps=20, device=args.device, port=None)                    # warm-up
    for _ in range(args.repeats):
        for enabled in (False, True):
            r = run_demo(steps=args.steps, device=args.device, every=args.every, port=None,
                         monitor_enabled=enabled)
            times[enabled].append(r.seconds)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    dev = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() and \
        args.device != "cpu" else f"cpu: {platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads"
    print(f"device {dev}; torch {torch.__version__}; {args.steps} steps, batch 256, "
          f"2 watched streams, publish every {args.every}; median of {args.repeats}")
    print(f"without repwatch {off:.3f} s   with repwatch {on:.3f} s   ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
