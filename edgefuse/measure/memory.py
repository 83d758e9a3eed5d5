"""Peak memory of running ONNX files with onnxruntime, measured in a fresh process so that nothing else (torch,
the exporter) hides under the high-water mark: `python -m edgefuse.measure.memory BATCH THREADS FILE...` prints MB."""
from __future__ import annotations

import resource
import sys
from pathlib import Path


def _status(field: str) -> float | None:
    """A memory figure of this process from /proc (MB), None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Linux lets a process reset its peak RSS to the current RSS, so imports do not hide what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(argv: list[str]) -> None:
    import numpy as np
    import onnxruntime as ort

    batch, threads, paths = int(argv[0]), int(argv[1]), argv[2:]
    exact = _reset_peak() and _status("VmRSS") is not None
    base = _status("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sessions = [ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for p in paths]
    for s in sessions:
        inp = s.get_inputs()[0]
        shape = [batch] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
        dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        for _ in range(3):
            s.run(None, {inp.name: np.random.rand(*shape).astype(dtype)})
    peak = _status("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(max(0.0, peak - base))


if __name__ == "__main__":
    main(sys.argv[1:])
