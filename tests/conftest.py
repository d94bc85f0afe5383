"""Session fixtures: one set of tiny random-weight SDXL components shared by the core tests."""

import pytest
import torch

from tests.sdxl_fixtures import tiny_components as build_tiny_components
from tests.sdxl_fixtures import tiny_host as build_tiny_host


@pytest.fixture(scope="session")
def tiny_components():
    torch.set_num_threads(1)  # the test machine is shared; one core keeps runs predictable
    return build_tiny_components(seed=0)


@pytest.fixture(scope="session")
def tiny_host(tiny_components):
    return build_tiny_host(tiny_components)
