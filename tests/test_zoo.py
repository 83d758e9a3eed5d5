import pytest
import torch

from edgefuse.models import data, train, zoo


def test_zoo_caches_and_does_not_retrain(tmp_path, monkeypatch):
    x, y = data.digits()
    images = torch.nn.functional.interpolate(x[:256], size=28)
    monkeypatch.setattr(data, "fashion_mnist", lambda split="train": (images, y[:256]))
    monkeypatch.setattr(data, "VALIDATION_IMAGES", 56)
    calls = []
    real = train.train_model
    monkeypatch.setattr(train, "train_model", lambda m, x, *a, **k: calls.append(x) or real(m, x, *a, **k))
    first, paths = zoo.zoo_models("mlp", 2, width=8, epochs=1, cache=tmp_path, quiet=True)
    assert len(calls) == 2 and all(p.suffix == ".safetensors" and p.is_file() for p in paths)
    held_out = data.load_dataset("fashion-mnist").x_val
    assert all(len(x) == 200 for x in calls)  # the validation images never reach training
    assert not (calls[0][:, None] == held_out[None]).flatten(2).all(2).any()
    second, _ = zoo.zoo_models("mlp", 2, width=8, epochs=1, cache=tmp_path, quiet=True)
    assert len(calls) == 2
    with torch.no_grad():
        for a, b in zip(first, second):
            torch.testing.assert_close(a(images[:4]), b(images[:4]))
    assert not torch.allclose(first[0](images[:4]), first[1](images[:4]))  # different seeds


def test_zoo_models_take_raw_images():
    model = zoo.cnn().eval()
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert isinstance(model[0], zoo.Normalize)


@pytest.mark.skipif(not (data.Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")).is_file(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_reads_the_test_split():
    x, y = data.fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and sorted(y.unique().tolist()) == list(range(10))


def test_missing_dataset_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_DIRS", (str(tmp_path),))
    with pytest.raises(data.EdgefuseError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist("test")
