import os

import pytest
import torch

# Deterministic, CPU-only, and small enough for a 2-core CI machine.
torch.manual_seed(0)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tmp_ckpt_dir(tmp_path):
    return tmp_path
