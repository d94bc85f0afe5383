"""Session fixtures: one set of tiny random-weight SDXL components shared by the core tests."""

import pytest
import torch

from tests.sdxl_fixtures import tiny_components as build_tiny_components
from tests.sdxl_fixtures import tiny_host as build_tiny_host


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped, saying why, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu); torch sees none here")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(no_gpu)


@pytest.fixture(scope="session")
def tiny_components():
    torch.set_num_threads(1)  # the test machine is shared; one core keeps runs predictable
    return build_tiny_components(seed=0)


@pytest.fixture(scope="session")
def tiny_host(tiny_components):
    return build_tiny_host(tiny_components)
