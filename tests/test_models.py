import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import edgefuse as ef

FACTORY = "tests.nets:digits_mlp"


def test_load_safetensors_and_torch(mlps, tmp_path):
    save_file(mlps[0].state_dict(), tmp_path / "a.safetensors")
    torch.save(mlps[1].state_dict(), tmp_path / "b.pt")
    loaded = ef.load_models(FACTORY, [tmp_path / "a.safetensors", tmp_path / "b.pt"])
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        for m, ref in zip(loaded, mlps[:2]):
            assert not m.training
            torch.testing.assert_close(m(x), ref(x))


def test_mismatched_checkpoint_names_first_key(cnns, tmp_path):
    save_file(cnns[0].state_dict(), tmp_path / "cnn.safetensors")
    with pytest.raises(ef.EdgefuseError, match="missing key '4.bias'"):
        ef.load_models(FACTORY, [tmp_path / "cnn.safetensors"])


def test_shape_mismatch_named(tmp_path):
    from tests.nets import digits_mlp
    state = digits_mlp().state_dict()
    state["2.weight"] = torch.zeros(5, 64)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ef.EdgefuseError, match=r"'2.weight' has shape \(5, 64\)"):
        ef.load_models(FACTORY, [tmp_path / "bad.pt"])


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EDGEFUSE_PWNED']}",))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EDGEFUSE_PWNED", str(marker))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": Payload()}, f)
    with pytest.raises(ef.EdgefuseError, match="cannot read checkpoint"):
        ef.load_models(FACTORY, [path])
    assert not marker.exists()


@pytest.mark.parametrize("factory,msg", [("nope.nowhere:f", "cannot import"), ("zoo:resnet999", "unknown model")])
def test_bad_factory(factory, msg):
    with pytest.raises(ef.EdgefuseError, match=msg):
        ef.load_models(factory, [])
