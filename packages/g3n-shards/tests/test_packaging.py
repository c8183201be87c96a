"""The contract stays light: a CPU-only site installs it without torch or any stage package."""

import re
from importlib.metadata import requires


def test_dependencies_are_numpy_pydantic_webdataset_zstandard_only():
    names = {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requires("g3n-shards") or []}
    assert names == {"numpy", "pydantic", "webdataset", "zstandard"}
