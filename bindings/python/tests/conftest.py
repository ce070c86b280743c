import numpy as np
import pytest

import kvcompress as kvc


@pytest.fixture
def ctx():
    with kvc.Context("cpu") as c:
        yield c


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _cuda_context_or_reason():
    try:
        kvc.Context("cuda", 0).close()
        return None
    except kvc.KvcError as e:
        return f"libkvcompress has no usable CUDA device ({e.status_name})"


@pytest.fixture(scope="session")
def cuda_ctx():
    reason = _cuda_context_or_reason()
    if reason:
        pytest.skip(reason)
    with kvc.Context("cuda", 0) as c:
        yield c
