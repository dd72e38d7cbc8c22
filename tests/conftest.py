"""Test-session settings: one intra-op thread per worker.

The tests run tiny models, where torch's thread pool costs more than it gains; parallelism
comes from pytest-xdist workers instead (``-n 2`` on CI's two cores).
"""

import torch

torch.set_num_threads(1)

# diffusers binds its log handler to the sys.stderr of the moment it is first imported. First
# imported inside a test that captures stderr, it would later write to that test's closed
# stream ("I/O operation on closed file" in another test's output). Import it at start-up,
# as a whole run's collection does anyway.
try:
    import diffusers  # noqa: F401
except ImportError:  # the core's tests run without the adapters' extra
    pass
