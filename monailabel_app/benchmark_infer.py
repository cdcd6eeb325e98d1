"""Concurrent infer requests against a real server: throughput, latency, the server's peak RSS.

    .venv/bin/python monailabel_app/benchmark_infer.py                       # tiny backbone, 64 px
    .venv/bin/python monailabel_app/benchmark_infer.py --backbone lite_medsam --image_size 256 --slices 4

Starts ``monailabel start_server`` (scripts/install_monailabel.sh's environment) on a free port
of 127.0.0.1 with one bundle whose ``models/model.pt`` is its untrained ``network_def`` (the
figures measure the serving path, not a model's quality), uploads ``--slices`` axial slices of
the MNI152 T1 template (197 x 233 each), sends one warm-up request, then ``--requests``
requests from ``--workers`` threads (a fixed count: the loop ends by itself), checks every
answer against the warm-up's label map, prints the figures as JSON and stops the server.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from client import LabelClient  # noqa: E402


def concurrent_infers(client: LabelClient, model: str, image_id: str, requests: int = 20, workers: int = 20,
                      params: dict | None = None) -> tuple[list[bytes], dict]:
    """Send ``requests`` infer requests from ``workers`` threads; returns the label files (in
    request order) and the figures. A failed request counts in ``errors`` (its answer is omitted)."""
    def one(_: int):
        start = time.perf_counter()
        try:
            return client.infer(model, image_id, params)[0], time.perf_counter() - start, None
        except Exception as exc:  # counted and reported, the other requests go on
            return None, time.perf_counter() - start, repr(exc)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - started
    latencies = [r[1] for r in results]
    errors = [r[2] for r in results if r[2]]
    answered = requests - len(errors)
    return [r[0] for r in results if r[0] is not None], {
        "requests": requests, "workers": workers, "errors": len(errors), "first_error": errors[0] if errors else None,
        "seconds": round(seconds, 2), "answered_per_s": round(answered / seconds, 3),
        "latency_median_s": round(statistics.median(latencies), 2), "latency_max_s": round(max(latencies), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="medsaga")
    parser.add_argument("--backbone", default="lite_medsam_tiny")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of the server")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a request may wait for its answer")
    args = parser.parse_args()

    import nibabel as nib
    import numpy as np
    import torch

    from harness import REPO, LabelServer, monailabel_python
    from medsaga_label.bundles import ServedBundle

    python = monailabel_python()
    work = Path(tempfile.mkdtemp(prefix="medsaga_label_bench_"))
    try:
        shutil.copytree(REPO / "bundles" / args.bundle / "configs", work / "bundles" / args.bundle / "configs")
        overrides = {"backbone": args.backbone, "image_size": args.image_size, "checkpoint": None}
        bundle = ServedBundle(work / "bundles" / args.bundle, overrides)
        bundle.model_path.parent.mkdir(parents=True)
        torch.manual_seed(0)
        torch.save(bundle.build_network().state_dict(), bundle.model_path)
        import importlib.util

        nilearn_data = Path(next(iter(importlib.util.find_spec("nilearn").submodule_search_locations))) / "datasets" / "data"
        t1 = nib.load(nilearn_data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
        middle = t1.shape[2] // 2
        volume = np.asarray(t1.dataobj)[:, :, middle - args.slices // 2: middle - args.slices // 2 + args.slices]
        (work / "data").mkdir()
        nib.save(nib.Nifti1Image(volume.astype(np.float32), t1.affine), work / "data" / "mni_t1.nii.gz")
        (work / "studies").mkdir()
        with LabelServer(python, work / "studies", work / "bundles", work / "server.log", {"overrides": overrides},
                         threads=args.threads) as server:
            server.wait_until_up(600)
            server.client.timeout = args.timeout
            server.client.upload_image("mni_t1", work / "data" / "mni_t1.nii.gz")
            started = time.perf_counter()
            reference = server.client.infer(args.bundle, "mni_t1")[0]
            single = time.perf_counter() - started
            rss_before = server.peak_rss_bytes()
            answers, figures = concurrent_infers(server.client, args.bundle, "mni_t1", args.requests, args.workers)
            reference_labels = _labels(reference)
            figures.update({
                "answers_equal_to_the_single_answer": sum(np.array_equal(_labels(a), reference_labels) for a in answers),
                "bundle": args.bundle, "backbone": args.backbone, "image_size": args.image_size,
                "volume": list(volume.shape), "server_threads": args.threads, "single_request_s": round(single, 2),
                "server_peak_rss_mb_after_one_request": round(rss_before / 2**20),
                "server_peak_rss_mb_after_load": round(server.peak_rss_bytes() / 2**20)})
        print(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _labels(payload: bytes):
    import nibabel as nib
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "label.nii.gz"
        path.write_bytes(payload)
        return np.asarray(nib.load(path).dataobj).copy()


if __name__ == "__main__":
    main()
