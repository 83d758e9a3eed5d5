"""Files a user hands over or edgefuse stored earlier are read by what they hold and checked before they are
trusted: checkpoint layouts of common trainers, formats whatever the suffix, truncation, target encodings, cached
weights that no longer load; and a setting that changes nothing says so."""
import torch
import pytest
from safetensors.torch import save_file

import edgefuse as ef
from edgefuse.base import errors
from edgefuse.models import zoo
from edgefuse.models.load import load_models, read_state_dict
from edgefuse.targets import load_target

from . import nets

FACTORY = "tests.nets:digits_cnn"


@pytest.fixture
def state():
    torch.manual_seed(0)
    return nets.digits_cnn().state_dict()


def same(model, state) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("layout", ["dataparallel", "lightning", "nested", "dataparallel-in-lightning"])
def test_common_checkpoint_layouts_load_when_unambiguous(state, tmp_path, layout):
    saved = {"dataparallel": {f"module.{k}": v for k, v in state.items()},
             "lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3,
                           "optimizer_states": [{"lr": torch.tensor(0.1)}]},
             "nested": {"model": state, "optimizer": {"state": {}}, "step": 100},
             "dataparallel-in-lightning": {"state_dict": {f"model.module.{k}": v for k, v in state.items()}}}[layout]
    torch.save(saved, tmp_path / "c.pt")
    (model,) = load_models(FACTORY, [tmp_path / "c.pt"])
    assert same(model, state)


def test_a_prefix_that_does_not_explain_the_keys_is_named(state, tmp_path):
    torch.save({f"module.{k}x": v for k, v in state.items()}, tmp_path / "c.pt")
    with pytest.raises(ef.EdgefuseError, match="every key starts with 'module.' and without it they still do not"):
        load_models(FACTORY, [tmp_path / "c.pt"])


def test_two_dicts_of_tensors_are_ambiguous_and_refused(state, tmp_path):
    torch.save({"model": state, "ema": state}, tmp_path / "c.pt")
    with pytest.raises(ef.EdgefuseError, match="nor a dict holding exactly one"):
        read_state_dict(tmp_path / "c.pt")


@pytest.mark.parametrize("writer,suffix", [("safetensors", ".pt"), ("torch", ".safetensors"), ("torch", ".bin")])
def test_the_format_is_read_from_the_file_not_its_suffix(state, tmp_path, writer, suffix):
    path = tmp_path / f"c{suffix}"
    save_file(state, path) if writer == "safetensors" else torch.save(state, path)
    (model,) = load_models(FACTORY, [path])
    assert same(model, state)


@pytest.mark.parametrize("writer", ["safetensors", "torch"])
def test_a_truncated_checkpoint_says_it_is_cut_short(state, tmp_path, writer):
    path = tmp_path / "c.ckpt"
    save_file(state, path) if writer == "safetensors" else torch.save(state, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ef.EdgefuseError, match=f"cannot read checkpoint {path}: it is cut short"):
        read_state_dict(path)


@pytest.mark.parametrize("content,why", [(b"", "the file is empty"), (b"hello world", "neither a safetensors")])
def test_a_file_that_is_no_checkpoint_says_what_it_is_not(tmp_path, content, why):
    (tmp_path / "c.pt").write_bytes(content)
    with pytest.raises(ef.EdgefuseError, match=why):
        read_state_dict(tmp_path / "c.pt")


def test_a_target_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "t.toml").write_bytes("description = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ef.EdgefuseError, match="is not UTF-8 text"):
        load_target(str(tmp_path / "t.toml"))


def test_cached_zoo_weights_that_do_not_load_are_not_trusted(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(errors, "_WARNED", set())
    folder = zoo.cache_dir(tmp_path, "mlp", 8, 1)
    folder.mkdir(parents=True)
    save_file(zoo.build("mlp", width=8).state_dict(), folder / "seed0.safetensors")
    (folder / "seed1.safetensors").write_bytes((folder / "seed0.safetensors").read_bytes()[:50])
    with pytest.raises(ef.EdgefuseError, match="seed1.safetensors"):  # train=False: named, never loaded
        zoo.zoo_models("mlp", 2, width=8, epochs=1, cache=tmp_path, train=False)
    assert "seed1.safetensors do not load" in capsys.readouterr().err


def test_bn_reset_without_batchnorm_says_it_changes_nothing(mlps, digits_split, capsys, monkeypatch):
    monkeypatch.setattr(errors, "_WARNED", set())
    calib = [digits_split[0][:256]]
    spec = ef.permutation_spec(mlps[0], calib[0][:2])
    ef.fuse(ef.align(mlps, spec), spec, depth=1, data=calib, repair="bn")
    ef.fuse(ef.align(mlps, spec), spec, depth=2, data=calib, repair="bn")
    err = capsys.readouterr().err
    assert err.count("has no BatchNorm") == 1 and len(err.strip().splitlines()) == 1  # once, one line
    ef.fuse(ef.align(mlps, spec), spec, depth=1, data=calib, repair="lsq")
    assert "BatchNorm" not in capsys.readouterr().err


@pytest.mark.parametrize("blocked,call,why", [
    ("sklearn", lambda: __import__("edgefuse.models.data", fromlist=["x"]).digits(), "pip install scikit-learn"),
    ("ot", lambda: __import__("edgefuse.align.ot", fromlist=["x"]).ot_assign(torch.eye(3).numpy()),
     "pip install POT")])
def test_a_missing_optional_library_is_the_users_one_line_fix(monkeypatch, blocked, call, why):
    import sys

    for name in [m for m in sys.modules if m == blocked or m.startswith(blocked + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, blocked, None)  # import raises ImportError, as when it is not installed
    with pytest.raises(ef.EdgefuseError, match=why):
        call()


def test_without_onnxsim_the_graph_is_written_unsimplified_and_said_once(mlps, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(errors, "_WARNED", set())
    monkeypatch.setitem(sys.modules, "onnxsim", None)
    for name in ("a", "b"):
        ef.export_onnx(mlps[0], torch.rand(2, 1, 8, 8), tmp_path / f"{name}.onnx")
        assert (tmp_path / f"{name}.onnx").is_file()
    assert capsys.readouterr().err.count("onnxsim is not installed") == 1


def test_cached_distilled_weights_that_do_not_load_are_distilled_again(mlps, tmp_path, capsys, monkeypatch):
    import numpy as np

    from edgefuse.fuse import DistillConfig
    from edgefuse.models.data import load_dataset
    from edgefuse.run.candidate import Point
    from edgefuse.run.points import Job, build

    monkeypatch.setattr(errors, "_WARNED", set())
    splits = load_dataset("digits")
    job = Job(point=Point("member", 0, distill=True), aligned=mlps, splits=splits, target=load_target("cpu-ort"),
              out_dir=str(tmp_path), ensemble_predictions=np.zeros(1), distill=DistillConfig(steps=3, batch_size=16),
              cache=str(tmp_path))
    first = build(job, splits).state_dict()
    (cached,) = (tmp_path / "distilled").iterdir()
    cached.write_bytes(cached.read_bytes()[:64])  # cut short, as by a full disk
    again = build(job, splits).state_dict()
    assert "do not load" in capsys.readouterr().err and cached.stat().st_size > 64  # distilled and stored again
    assert all(torch.equal(first[k], again[k]) for k in first)  # the same seeded distillation


def test_a_fused_point_is_kept_for_the_next_run_and_rebuilt_when_its_inputs_change(cnns, tmp_path, capsys,
                                                                                   monkeypatch):
    """A second build of the same point loads the repaired model the first stored (the same function, no repair
    run); other calibration images, or other code, make a new key; a cut entry is built again."""
    import numpy as np

    from edgefuse.models.data import load_dataset
    from edgefuse.run import points
    from edgefuse.run.candidate import Point
    from edgefuse.run.points import Job, build

    monkeypatch.setattr(errors, "_WARNED", set())
    splits = load_dataset("digits")
    spec = ef.permutation_spec(cnns[0], splits.example)
    aligned = [ef.permute(m, spec, p) for m, p in zip(cnns, ef.align_perms(cnns, spec, data=splits.calib_batches))]

    def built(s=splits) -> tuple[torch.nn.Module, dict]:
        seconds = {}
        job = Job(point=Point("alpha", 0.25, "activation", "lsq"), aligned=aligned, splits=s,
                  target=load_target("cpu-ort"), out_dir=str(tmp_path), ensemble_predictions=np.zeros(1),
                  cache=str(tmp_path), spec=spec)
        return build(job, s, seconds), seconds

    first, how = built()
    assert "fuse and repair" in how
    second, how = built()
    assert list(how) == ["loaded"] and second is not first
    x = splits.x_val[:32]
    with torch.no_grad():
        assert torch.equal(first(x), second(x))
    (entry,) = (tmp_path / "fused").iterdir()
    assert "fuse and repair" in built(splits.with_calibration(100))[1]  # other calibration images
    monkeypatch.setattr(points, "code_digest", lambda: "changed")
    assert "fuse and repair" in built()[1]  # other code
    assert len(list((tmp_path / "fused").iterdir())) == 3
    monkeypatch.undo()
    monkeypatch.setattr(errors, "_WARNED", set())
    entry.write_bytes(entry.read_bytes()[:64])  # cut short, as by a full disk
    assert "fuse and repair" in built()[1] and "does not load" in capsys.readouterr().err
    assert entry.stat().st_size > 64  # stored again


def test_a_graphs_outputs_are_kept_by_its_bytes_and_computed_again_when_it_changes(mlps, tmp_path, capsys,
                                                                                  monkeypatch):
    import numpy as np

    from edgefuse.measure.runners import OrtRunner
    from edgefuse.models.data import load_dataset
    from edgefuse.run import kept

    monkeypatch.setattr(errors, "_WARNED", set())
    splits = load_dataset("digits")
    graph = ef.export_onnx(mlps[0], splits.example, tmp_path / "m.onnx")
    runs = []
    real = kept.predict_with_heads
    monkeypatch.setattr(kept, "predict_with_heads", lambda r, x: runs.append(len(x)) or real(r, x))
    first, _ = kept.kept_outputs(tmp_path, OrtRunner(graph), splits, "validation")
    again, _ = kept.kept_outputs(tmp_path, OrtRunner(graph), splits, "validation")
    assert runs == [len(splits.x_val)] and np.array_equal(first, again)
    test, _ = kept.kept_outputs(tmp_path, OrtRunner(graph), splits, "test")
    assert runs[-1] == len(splits.x_test) and len(test) == len(splits.x_test)  # another split, another entry
    ef.export_onnx(mlps[1], splits.example, graph)  # the same file name, another graph
    other, _ = kept.kept_outputs(tmp_path, OrtRunner(graph), splits, "validation")
    assert len(runs) == 3 and not np.array_equal(first, other)
    for entry in (tmp_path / "scores").iterdir():
        entry.write_bytes(entry.read_bytes()[:40])
    kept.kept_outputs(tmp_path, OrtRunner(graph), splits, "validation")
    assert len(runs) == 4 and "do not load" in capsys.readouterr().err


def test_an_alignment_is_kept_for_the_next_run(cnns, tmp_path, monkeypatch):
    """The second run of the same models and calibration images reads the permutations the first computed (and
    says so); the aligned models are the same."""
    from rich.console import Console

    from edgefuse.models.data import load_dataset
    from edgefuse.run import setup
    from edgefuse.run.config import RunConfig

    computed = []
    real = setup.align_perms
    monkeypatch.setattr(setup, "align_perms", lambda *a, **k: computed.append(1) or real(*a, **k))
    run = RunConfig(models=tuple(cnns), data=load_dataset("digits"), cache=str(tmp_path))
    first, second = (setup.prepare(run, Console(quiet=True)) for _ in range(2))
    assert computed == [1] and first.align_seconds == second.align_seconds  # the time it took when computed
    for a, b in zip(first.aligned["activation"], second.aligned["activation"]):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    setup.prepare(RunConfig(models=tuple(reversed(cnns)), data=load_dataset("digits"), cache=str(tmp_path)),
                  Console(quiet=True))
    assert computed == [1, 1]  # other models, another entry
