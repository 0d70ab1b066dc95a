import importlib.util
import textwrap

import pytest


@pytest.fixture
def make_dist():
    """Writes a real installed distribution into a folder: a dist-info with entry points (which
    importlib.metadata finds once the folder is on sys.path or PYTHONPATH) plus plugin modules."""

    def make(folder, name, entry_points, modules):
        info = folder / f"{name.replace('-', '_')}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
        (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
        for mod, code in modules.items():
            (folder / f"{mod}.py").write_text(textwrap.dedent(code))
        return folder

    return make


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where cupy sees a CUDA device; elsewhere they are skipped with the reason."""
    reason = gpu_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_gpu_reason: list = []


def gpu_unavailable_reason():
    if not _gpu_reason:
        if importlib.util.find_spec("cupy") is None:
            _gpu_reason.append("cupy is not installed")
        else:
            try:
                import cupy

                n = cupy.cuda.runtime.getDeviceCount()
                _gpu_reason.append(None if n > 0 else "no CUDA device")
            except Exception as exc:  # no driver, no device
                _gpu_reason.append(f"no usable CUDA device ({type(exc).__name__})")
    return _gpu_reason[0]
