"""Peak memory of running ONNX files with onnxruntime, measured in a fresh process so that nothing else (torch,
the exporter) hides under the high-water mark: `python -m edgefuse.memprobe BATCH THREADS FILE...` prints MB."""
from __future__ import annotations

import resource
import sys


def main(argv: list[str]) -> None:
    import numpy as np
    import onnxruntime as ort

    batch, threads, paths = int(argv[0]), int(argv[1]), argv[2:]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sessions = [ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"]) for p in paths]
    for s in sessions:
        inp = s.get_inputs()[0]
        shape = [batch] + [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
        dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        for _ in range(3):
            s.run(None, {inp.name: np.random.rand(*shape).astype(dtype)})
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)


if __name__ == "__main__":
    main(sys.argv[1:])
