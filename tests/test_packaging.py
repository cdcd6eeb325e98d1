"""``medsaga package``: the bundle zip, its plain merged weights, and a real download of it with
``python -m monai.bundle download`` from a local HTTP server, then inference from the copy."""

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_runs import REPO, run_bundle
from medsaga_components import SamSegmenter
from medsaga_components.methods import build_network
from medsaga_components.packaging import PackagingError, bundle_identity, package_bundle

TINY = {"backbone": "lite_medsam_tiny", "image_size": 64}


def bundle_copy(tmp_path, name):
    """The repository bundle's shipped files (no models/, data/, eval/) in a scratch folder."""
    root = tmp_path / name
    for part in ("configs", "docs"):
        shutil.copytree(REPO / "bundles" / name / part, root / part)
    for part in ("LICENSE", "large_files.yml"):
        shutil.copy(REPO / "bundles" / name / part, root / part)
    return root


def tiny_plain(prompt="none"):
    """A tiny untrained network whose class heads are not all zero (a fresh widened decoder
    gives every class logit 0, hence an all-background label map)."""
    network = SamSegmenter("lite_medsam_tiny", 2, checkpoint=None, image_size=64, prompt=prompt).eval()
    with torch.no_grad():
        for mlp in network.backbone.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.normal_(0, 0.5)
    return network


def test_refuses_a_bundle_without_a_trained_model(tmp_path):
    root = bundle_copy(tmp_path, "medsaga")
    with pytest.raises(PackagingError, match=r"no trained model .*models/model.pt.*train it first"):
        package_bundle(root, tmp_path / "dist")
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


def test_refuses_weights_that_do_not_fit_and_unknown_settings(tmp_path):
    root = bundle_copy(tmp_path, "medsaga")
    (root / "models").mkdir()
    torch.save(tiny_plain().state_dict(), root / "models" / "model.pt")
    # Without the settings it was trained with, the tiny model does not fit lite_medsam.
    with pytest.raises(PackagingError, match=r"model.pt.*does not fit .*--backbone"):
        package_bundle(root, tmp_path / "dist")
    with pytest.raises(PackagingError, match=r"\['no_such_key'\]"):
        package_bundle(root, tmp_path / "dist", no_such_key=1, **TINY)
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


def test_adapter_weights_are_merged_into_plain_tensors(tmp_path):
    """A samed model file saved with its LoRA weights still in it: the zip ships the merged
    plain network, which computes what the adapted one did."""
    root = bundle_copy(tmp_path, "samed")
    adapted = build_network("samed", backbone="lite_medsam_tiny", num_classes=2, checkpoint=None, image_size=64)
    with torch.no_grad():  # LoRA's B starts at 0; make the adapters change the output
        for name, p in adapted.named_parameters():
            if "lora" in name.lower():
                p.normal_(0, 0.05)
    state = adapted.state_dict()
    assert any("lora" in k.lower() for k in state)
    (root / "models").mkdir()
    torch.save(state, root / "models" / "model.pt")

    zip_path = package_bundle(root, tmp_path / "dist", **TINY)
    name, version = bundle_identity(root)
    assert zip_path.name == f"{name}_v{version}.zip" == "samed_v0.1.0.zip"
    with zipfile.ZipFile(zip_path) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "unzipped")
    for required in ("configs/metadata.json", "configs/inference.json", "configs/train.json", "docs/README.md",
                     "LICENSE", "large_files.yml", "models/model.pt"):
        assert f"samed/{required}" in names
    assert all(n.startswith("samed/") for n in names)
    packaged = tmp_path / "unzipped" / "samed"
    weights = torch.load(packaged / "models" / "model.pt", weights_only=True)
    assert not any("lora" in k.lower() for k in weights)
    plain = tiny_plain()
    plain.load_state_dict(weights, strict=True)
    image = torch.rand(1, 1, 64, 64)
    adapted.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(image), adapted(image), atol=1e-4, rtol=1e-4)
    # The settings are in the packaged configs, so the download runs without overrides.
    inference = (packaged / "configs" / "inference.json").read_text()
    assert '"backbone": "lite_medsam_tiny"' in inference and '"image_size": 64' in inference


def small_volume_dir(tmp_path):
    folder = tmp_path / "volumes"
    folder.mkdir()
    rng = np.random.default_rng(0)
    data = (rng.random((40, 36, 5)) * 200).astype(np.float32)
    data[10:30, 8:28, :] += 300  # a bright block, so that the label map is not constant
    affine = np.diag([1.5, 1.2, 3.0, 1.0])
    affine[:3, 3] = [-30, 12, 5]
    nib.save(nib.Nifti1Image(data, affine), folder / "case_0.nii.gz")
    return folder


@pytest.mark.slow
def test_downloaded_zip_runs_inference_like_the_repository_bundle(tmp_path):
    root = bundle_copy(tmp_path, "medsaga")
    (root / "models").mkdir()
    torch.save(tiny_plain().state_dict(), root / "models" / "model.pt")
    volumes = small_volume_dir(tmp_path)
    dist = tmp_path / "dist"
    medsaga = shutil.which("medsaga") or str(os.path.join(os.path.dirname(sys.executable), "medsaga"))
    done = subprocess.run([medsaga, "package", "--bundle", str(root), "--out", str(dist), "--backbone",
                           "lite_medsam_tiny", "--image_size", "64"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (dist / "medsaga_v0.1.0.zip").is_file()

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(dist))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        downloads = tmp_path / "fresh" / "bundles"
        downloads.mkdir(parents=True)
        url = f"http://127.0.0.1:{server.server_address[1]}/medsaga_v0.1.0.zip"
        done = subprocess.run([sys.executable, "-m", "monai.bundle", "download", "--name", "medsaga", "--url", url,
                               "--bundle_dir", str(downloads)], capture_output=True, text=True, cwd=tmp_path / "fresh")
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        server.shutdown()
        server.server_close()
    copy = downloads / "medsaga"
    assert (copy / "models" / "model.pt").is_file() and (copy / "configs" / "inference.json").is_file()

    # The downloaded copy, run from its own folder: no repository path, no override.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
                           str(copy / "configs" / "inference.json"), "--dataset_dir", str(volumes)],
                          capture_output=True, text=True, cwd=copy, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # The repository bundle with the same model and the settings given on the command line.
    run_bundle("inference", str(REPO / "bundles" / "medsaga" / "configs" / "inference.json"), "--bundle_root",
               str(root), "--dataset_dir", str(volumes), "--backbone", "lite_medsam_tiny", "--image_size", "64")
    downloaded = nib.load(copy / "eval" / "inference" / "case_0_seg.nii.gz")
    repository = nib.load(root / "eval" / "inference" / "case_0_seg.nii.gz")
    source = nib.load(volumes / "case_0.nii.gz")
    assert downloaded.shape == source.shape
    np.testing.assert_allclose(downloaded.affine, source.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(downloaded.dataobj), np.asarray(repository.dataobj))
    assert len(np.unique(np.asarray(downloaded.dataobj))) > 1
