import pytest
import torch


@pytest.fixture
def gen():
    """A seeded generator: fresh, reproducible random inputs for each test."""
    return torch.Generator().manual_seed(1234)
