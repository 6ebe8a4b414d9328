"""Shared test set-up: one intra-op thread for the tiny models.

Tiny tensors run fastest on one thread; two threads thrash when the two cores are shared with other
work (measured ~20x slower). Tests that time nothing are unaffected in what they assert.
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
