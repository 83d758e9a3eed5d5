import pytest
import torch

from edgefuse.models import data, zoo

from . import nets


def train_digits(factory, n: int, epochs: int = 30) -> list[torch.nn.Module]:
    torch.set_num_threads(2)
    x, y = data.digits()
    models = []
    for s in range(n):
        torch.manual_seed(s)
        models.append(zoo.train_model(factory(), x[:1000], y[:1000], epochs, seed=s, batch_size=64, lr=3e-3))
    return models


@pytest.fixture(scope="session")
def digits_split():
    x, y = data.digits()
    return x[:1000], x[1000:], y[1000:]


def save_checkpoints(models, folder) -> list[str]:
    """The first three models as safetensors files, the way a user hands them to the CLI."""
    from safetensors.torch import save_file

    paths = []
    for i, m in enumerate(models[:3]):
        save_file(m.state_dict(), folder / f"m{i}.safetensors")
        paths.append(str(folder / f"m{i}.safetensors"))
    return paths


@pytest.fixture(scope="session")
def cnn_checkpoints(cnns, tmp_path_factory):
    return save_checkpoints(cnns, tmp_path_factory.mktemp("cnn-ckpt"))


@pytest.fixture(scope="session")
def mlp_checkpoints(mlps, tmp_path_factory):
    return save_checkpoints(mlps, tmp_path_factory.mktemp("mlp-ckpt"))


@pytest.fixture(scope="session")
def mlps():
    return train_digits(nets.digits_mlp, 4)


@pytest.fixture(scope="session")
def cnns():
    return train_digits(nets.digits_cnn, 4, epochs=15)
