"""tests/offload: the small models run on one thread (their GEMMs are tiny; threads only add noise)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _prefer_installed_kernels() -> None:
    """transformers >= 5.25 depends on (and imports) the ``kernels`` distribution; under
    ``python -m pytest`` the repository root is on ``sys.path`` and its ``kernels/`` folder (the
    source of ``moekit.kernels``) shadows it, so every ``from_pretrained`` fails with "cannot import
    name 'CUDAProperties' from 'kernels'". Import the installed one first, with the root hidden."""
    import importlib
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if "kernels" in sys.modules:
        return
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        importlib.import_module("kernels")
    except ImportError:      # not installed: transformers then does not import it either
        pass
    finally:
        sys.path[:] = saved


_prefer_installed_kernels()
