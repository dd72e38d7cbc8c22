"""Test-session settings: one intra-op thread per worker.

The tests run tiny models, where torch's thread pool costs more than it gains; parallelism
comes from pytest-xdist workers instead (``-n 2`` on CI's two cores).
"""

import torch

torch.set_num_threads(1)
