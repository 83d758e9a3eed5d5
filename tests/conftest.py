import pytest
import torch

from edgefuse import data, zoo

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


@pytest.fixture(scope="session")
def mlps():
    return train_digits(nets.digits_mlp, 4)


@pytest.fixture(scope="session")
def cnns():
    return train_digits(nets.digits_cnn, 4, epochs=15)
