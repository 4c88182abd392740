"""What the detector's extra members cost: the exported network with all its FPN + heads against
its first alone, same backbone, both runtimes, one photo at a time.

    .venv/bin/python bench/bench_detector_members.py data/detector [--threads 1] [--repeats 10]

Prints the median ms per photo of each export over ``--repeats`` rounds of ``--calls`` calls,
the two timed in turn within each round (the machine is shared: compare the ratio).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from visrec.inference.detector_runtime import Detector, export_detector
from visrec.models.detector import MainbodyDetector
from visrec.training.detector import load_trained
from visrec.utils.logs import setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished detector run (data/detector)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    setup_logging("WARNING")
    model, config = load_trained(args.run_dir)
    if len(model.members) < 2:
        raise SystemExit(f"{args.run_dir} holds a one-member detector: nothing to compare")
    first = MainbodyDetector.from_members([model])
    first.eval()
    size = config["image"]["size"]
    batch = np.random.default_rng(0).uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="visrec-bench-members-") as tmp:
        names = {"first member": first, f"all {len(model.members)} members": model}
        for name, net in names.items():
            export_detector(net, {**config, "members": len(net.members)}, Path(tmp) / name)
        for backend in ("onnx", "paddle"):
            detectors = {n: Detector(Path(tmp) / n, backend=backend, num_threads=args.threads) for n in names}
            for detector in detectors.values():  # warm-up
                for _ in range(10):
                    detector.predict_dense(batch)
            times: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(args.repeats):
                for name, detector in detectors.items():
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        detector.predict_dense(batch)
                    times[name].append((time.perf_counter() - start) / args.calls * 1000)
            medians = {n: float(np.median(t)) for n, t in times.items()}
            first_ms, all_ms = medians.values()
            print(f"{backend:<7} " + "  ".join(f"{n}: {ms:.2f} ms" for n, ms in medians.items())
                  + f"  ratio {all_ms / first_ms:.2f}x")


if __name__ == "__main__":
    main()
