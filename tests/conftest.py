import importlib.util
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def mni_files():
    """Paths of the MNI ICBM152 2009a T1 and tissue maps shipped in nilearn's wheel."""
    spec = importlib.util.find_spec("nilearn")
    assert spec is not None, "nilearn's data files are installed by scripts/setup_env.sh"
    root = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return {k: root / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The MNI152 demo task written once per test module (a Decathlon folder)."""
    from medsaga_components.data import write_demo_dataset

    out = tmp_path_factory.mktemp("data") / "mni152_demo"
    write_demo_dataset(str(out))
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and shared CI machines oversubscribe a second one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
