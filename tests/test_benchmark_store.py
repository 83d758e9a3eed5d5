"""benchmarks/common.py: a finished zoo's result is measured once, read back while its digest holds, and measured
again when its file was cut short or edited."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks import each other by name
from common import resumed  # noqa: E402


def test_a_result_is_measured_once_and_measured_again_when_its_file_is_not_what_was_written(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return {"accuracy": 0.9, "calls": len(calls)}

    path = tmp_path / "zoo-0.json"
    assert resumed(path, measure) == {"accuracy": 0.9, "calls": 1}
    assert resumed(path, measure) == {"accuracy": 0.9, "calls": 1} and len(calls) == 1
    stored = json.loads(path.read_text())
    path.write_text(json.dumps(stored | {"result": {"accuracy": 0.99, "calls": 1}}))  # edited by hand
    assert resumed(path, measure) == {"accuracy": 0.9, "calls": 2}
    path.write_text(path.read_text()[:20])  # cut short
    assert resumed(path, measure)["calls"] == 3 and len(calls) == 3
