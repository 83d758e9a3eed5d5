import pytest
import torch

from edgefuse.measure.runners import torch_threads
from edgefuse.models import data, zoo

from . import nets


def two_threads():
    """The test zoos are trained on 2 threads (their weights depend on it); every test after runs on the thread
    count `make test` gives each worker (1), as two workers share 2 cores."""
    return torch_threads(2)


def train_digits(factory, n: int, epochs: int = 30) -> list[torch.nn.Module]:
    x, y = data.digits()
    models = []
    with two_threads():
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


@pytest.fixture(scope="session")
def finetunes():
    """(base, 4 fine-tunes of it): the base trained on the first 500 digits, each copy on the next 500 with its own
    seed and learning rate — the regime where members share a basin."""
    import copy

    x, y = data.digits()
    with two_threads():
        torch.manual_seed(100)
        base = zoo.train_model(nets.digits_cnn(), x[:500], y[:500], 15, seed=100, batch_size=64, lr=3e-3)
        members = []
        for s, lr in enumerate((1e-3, 5e-4, 2e-3, 7e-4)):
            members.append(zoo.train_model(copy.deepcopy(base), x[500:1000], y[500:1000], 3, seed=s, batch_size=64,
                                           lr=lr))
    return base, members
