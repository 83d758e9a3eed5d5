"""Trust nothing stored and let no output race: a resumed sweep checks every stored point's digests before it
reuses one, and every command's output is claimed under a lock, replaced only with --force."""
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgefuse.base.files import exclusive
from edgefuse.cli import cli
from edgefuse.run.config import RunConfig

# α 0.1 stays within cpu-ort's MACs budget: these graphs run in microseconds, where an α point outside it can time
# faster than every member and leave nothing within it undominated.
SWEEP = ["-q", "sweep", "--model", "tests.nets:digits_mlp", "--dataset", "digits", "--alpha", "0.1", "--workers", "0",
         "--distill-steps", "0"]
KEY = f"{RunConfig.methods[0]}-depth1-lsq"


@pytest.fixture(scope="module")
def first_sweep(mlp_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    res = CliRunner().invoke(cli, [*SWEEP, *mlp_checkpoints, "--out-root", str(root)])
    assert res.exit_code == 0, res.output
    return root, json.loads((root / "cpu-ort" / "sweep" / "sweep.json").read_text())


def resume(first_sweep, mlp_checkpoints, tmp_path, edit) -> tuple[str, dict, dict]:
    """Copy the first sweep, apply `edit` to its stored state, resume it; the output, the new and the first row."""
    root, first = first_sweep
    copy = Path(shutil.copytree(root, tmp_path / "copy"))
    edit(copy / "cpu-ort" / "sweep")
    res = CliRunner().invoke(cli, [*SWEEP[1:], *mlp_checkpoints, "--out-root", str(copy)])
    assert res.exit_code == 0, res.output
    again = json.loads((copy / "cpu-ort" / "sweep" / "sweep.json").read_text())
    row = next(c for c in again["candidates"] if c["key"] == KEY)
    return " ".join(res.output.split()), row, next(c for c in first["candidates"] if c["key"] == KEY)


def claim_better(sweep: Path) -> None:
    path = sweep / "points" / f"{KEY}.json"
    point = json.loads(path.read_text())
    point["validation"]["accuracy"] = 1.0
    path.write_text(json.dumps(point))


def tamper_file(sweep: Path) -> None:
    with open(sweep / "candidates" / f"{KEY}.onnx", "ab") as f:
        f.write(b"\0")


def truncate(sweep: Path) -> None:
    path = sweep / "points" / f"{KEY}.json"
    path.write_bytes(path.read_bytes()[:100])


def escape(sweep: Path) -> None:
    path = sweep / "points" / f"{KEY}.json"
    point = json.loads(path.read_text())
    point["files"] = {"../../elsewhere.onnx": "0"}
    path.write_text(json.dumps(point))


@pytest.mark.parametrize("edit,why", [(claim_better, "does not match its digest"), (tamper_file, "missing or changed"),
                                      (truncate, "cannot be read"), (escape, "does not match its digest")])
def test_an_edited_stored_point_is_measured_again(first_sweep, mlp_checkpoints, tmp_path, edit, why):
    output, row, first = resume(first_sweep, mlp_checkpoints, tmp_path, edit)
    assert f"stored point {KEY}" in output and why in output
    assert row["validation"] == first["validation"] and row["test"] == first["test"]  # measured, not taken
    path = tmp_path / "copy" / "cpu-ort" / "sweep" / "points" / f"{KEY}.json"
    assert json.loads(path.read_text())["validation"]["accuracy"] == first["validation"]["accuracy"]  # restored


def test_an_untouched_stored_point_is_reused_as_stored(first_sweep, mlp_checkpoints, tmp_path):
    output, row, first = resume(first_sweep, mlp_checkpoints, tmp_path, lambda sweep: None)
    assert "stored point" not in output
    assert {k: v for k, v in row.items() if k != "dominated_by"} == \
        {k: v for k, v in first.items() if k != "dominated_by"}


def test_a_second_fuse_into_the_same_file_stops_at_once(mlp_checkpoints, tmp_path):
    out = tmp_path / "same.onnx"
    args = ["-q", "fuse", "--model", "tests.nets:digits_mlp", *mlp_checkpoints, "--dataset", "digits", "--depth", "1",
            "-o", str(out)]
    with exclusive(tmp_path / ".same.onnx.lock", str(out)):  # another writer holds the file (this process)
        res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and f"(pid {os.getpid()}) is writing" in res.output and not out.exists()
    assert CliRunner().invoke(cli, args).exit_code == 0 and out.is_file()
    before = out.read_bytes()
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "use --force" in res.output and out.read_bytes() == before
    assert CliRunner().invoke(cli, [*args, "--force"]).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.onnx"]  # no lock or temporary file left


def test_a_sweep_holds_the_exports_lock(mlp_checkpoints, tmp_path):
    with exclusive(tmp_path / ".cpu-ort.lock", "an export"):
        res = CliRunner().invoke(cli, [*SWEEP, *mlp_checkpoints, "--out-root", str(tmp_path)])
    assert res.exit_code == 1 and "is writing" in res.output
    assert not (tmp_path / "cpu-ort" / "sweep" / "sweep.json").exists()
