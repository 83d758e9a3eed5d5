"""Build a TensorRT engine from an edgefuse bundle on the device, run it on the golden inputs, compare with the
reference outputs at the target's tolerance, and print latency; with --choose, do that for every candidate the
host sent and ship the most accurate that fits the budget on this device.

This file is edgefuse's device entry point, copied as-is into every deploy bundle with its siblings golden.py,
engines.py, runtimes.py and device_choice.py: it needs only Python 3.8+, numpy and either the TensorRT Python
bindings (with torch for device buffers) or the `trtexec` tool. `--runtime onnxruntime` runs the same steps with
onnxruntime, which is how a bundle is tested off the device.

    python3 deploy.py [--runtime trtexec]   # in the bundle: build, check, time; exit 0 PASS, 1 FAIL, 2 could not check
    python3 deploy.py --choose [--latency-ms MS]   # exit 0 chosen, 1 no candidate matches, 2 none fits the budget
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:  # in the package, and as a script in a bundle (its siblings sit beside it)
    from . import device_choice
    from .golden import DeployError, compare, percentiles, read_bundle
    from .runtimes import RUNTIMES, resolve
    from .stages import open_runner
except ImportError:
    import device_choice
    from golden import DeployError, compare, percentiles, read_bundle
    from runtimes import RUNTIMES, resolve
    from stages import open_runner

SCRIPTS = ("deploy.py", "golden.py", "engines.py", "runtimes.py", "device_choice.py", "stages.py")  # a bundle's


def check_bundle(bundle: Path, runtime: str = "auto", seconds: float = 1.0) -> dict:
    """Build (TensorRT), run the golden inputs, compare, time; DeployError when the bundle cannot be checked."""
    bundle = Path(bundle)
    target, x, references = read_bundle(bundle)
    runtime = resolve(runtime)
    runner = open_runner(bundle, target, runtime, bundle / "timing.cache")
    outputs = runner(x)
    if runtime == "tensorrt" and target.get("graph") == "int8":
        for kind, names in runner.layer_types().items():
            print(f"layers with {kind} outputs: {len(names)}" + ("" if "Int8" in kind else
                                                                f" (higher precision: {', '.join(names[:8])})"))
    problems = compare(outputs, references, target)
    return {"runtime": runtime, "batch": int(x.shape[0]), "ok": not problems, "problems": problems,
            "latency_ms": percentiles(runner.latency(x, seconds))}


def _one_line(e: Exception) -> str:
    return str(e) if isinstance(e, DeployError) else f"could not check the bundle: {type(e).__name__}: " + \
        (str(e).strip().splitlines() or [""])[0]


def _choose(args: argparse.Namespace) -> int:
    try:
        choice = device_choice.choose(Path(args.bundle), args.runtime, args.latency_ms, args.seconds)
    except device_choice.NoFit as e:
        print(f"deploy: {e}", file=sys.stderr)
        return 2
    except device_choice.NoMatch as e:
        print(f"deploy: FAIL: {e}", file=sys.stderr)
        return 1
    chosen = next(c for c in choice["candidates"] if c["key"] == choice["chosen"])
    print(f"chose {choice['label']}: {choice['reason']}; wrote choice.json"
          + (" and model.engine" if chosen["engine"] else "")
          + (f" (a cascade: its engines are {' and '.join(chosen['engines'])}, run by stages.py)"
             if chosen.get("engines") else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=str(Path(__file__).resolve().parent), help="bundle folder (default: here)")
    ap.add_argument("--runtime", default="auto", choices=["auto", *RUNTIMES])
    ap.add_argument("--choose", action="store_true", help="measure every candidate here and ship the best that fits")
    ap.add_argument("--latency-ms", type=float, default=None,
                    help="with --choose: p50 budget in ms at every batch size (default: the target's)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="timing per batch size after a 0.2 s warm-up (default 3 with --choose, else 1)")
    args = ap.parse_args(argv)
    if args.seconds is not None and not args.seconds > 0:
        ap.error("--seconds must be positive")
    if args.latency_ms is not None and not args.choose:
        ap.error("--latency-ms applies to --choose")
    if args.choose:
        args.seconds = args.seconds or 3.0
        try:
            return _choose(args)
        except Exception as e:  # a runtime's own error (a truncated model.onnx, a failed build): one line
            print(f"deploy: error: {_one_line(e)}", file=sys.stderr)
            return 2
    try:
        result = check_bundle(Path(args.bundle), args.runtime, args.seconds or 1.0)
    except Exception as e:  # ours, or a runtime's own: one line either way
        print(f"deploy: error: {_one_line(e)}", file=sys.stderr)
        return 2
    lat = result["latency_ms"]
    print(f"{result['runtime']}, batch {result['batch']}: p50 {lat['p50']:.3f} ms (min {lat['min']:.3f}, "
          f"p90 {lat['p90']:.3f}, p99 {lat['p99']:.3f})")
    for p in result["problems"]:
        print(f"MISMATCH {p}")
    print("PASS: outputs match the references" if result["ok"] else "FAIL: outputs differ from the references")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
