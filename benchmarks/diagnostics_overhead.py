"""Overhead of the training diagnostics at their default interval (every evaluation).

Runs the same configuration with diagnostics at the default interval and with them off
(interval beyond the run), interleaved A B A B ..., and reports the median wall-time ratio.
Usage: python benchmarks/diagnostics_overhead.py [--preset tiny-cpu] [--reps 3] [--key=value ...]
"""
import argparse
import platform
import statistics
import sys
import tempfile
import time

import torch

from manifold_muon.lab.bench import write_result
from manifold_muon.lab.config import make_config
from manifold_muon.lab.train import train


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny-cpu")
    ap.add_argument("--allocation", default="hetero")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args, extra = ap.parse_known_args()
    overrides = dict(x[2:].split("=", 1) for x in extra)
    times = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for mode in ("on", "off"):
                cfg = make_config(args.preset, {**overrides, "allocation": args.allocation, "quiet": "true",
                                                "out_dir": f"{tmp}/{mode}{rep}", "eval_interval": overrides.get("eval_interval", "25"),
                                                **({} if mode == "on" else {"diag_interval": "1000000000"})})
                start = time.perf_counter()
                train(cfg)
                times[mode].append(time.perf_counter() - start)
                print(f"rep {rep} diagnostics {mode}: {times[mode][-1]:.2f} s", flush=True)
    ratio = statistics.median(a / b for a, b in zip(times["on"], times["off"]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    result = {"date": time.strftime("%Y-%m-%d"), "device": device, "preset": args.preset, "allocation": args.allocation,
              "overrides": overrides, "seconds_on": times["on"], "seconds_off": times["off"], "median_ratio": ratio}
    write_result(result, args.out,
                 f"diagnostics_overhead_{result['date']}_{'gpu' if torch.cuda.is_available() else 'cpu'}.json")
    print(f"\nwhole-run time with/without diagnostics (median of {args.reps} interleaved pairs): {ratio:.4f} "
          f"({(ratio - 1) * 100:+.1f}%) on {device}")


if __name__ == "__main__":
    sys.exit(main())
