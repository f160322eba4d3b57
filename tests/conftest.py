import logging
import warnings

import pytest


@pytest.fixture(autouse=True)
def _quiet_lightning():
    # Lightning's banner lines (GPU available, tips) drown the test output.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LitLogger.*")
        yield
