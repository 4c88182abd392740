"""Shared fixtures: paths to the repo and to the real CUB subset beside it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CUB_SUBSET = REPO.parent / "shared" / "data" / "cub_subset" / "CUB_200_2011"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def cub_subset() -> Path:
    if not (CUB_SUBSET / "images.txt").exists():
        pytest.skip(f"real CUB subset not found at {CUB_SUBSET}")
    return CUB_SUBSET


@pytest.fixture(scope="session")
def tiny_cub(tmp_path_factory):
    """A small synthetic CUB folder and its class split: (raw CUB root, split dir).

    8 classes x 8 images at 64 px; classes 1-4 train, 5-8 test. Generated once per session.
    """
    from visrec.config import SyntheticConfig
    from visrec.data.cub import read_cub
    from visrec.data.split import write_split
    from visrec.data.synthetic import generate

    base = tmp_path_factory.mktemp("tiny_cub")
    root = generate(base / "raw", SyntheticConfig(num_classes=8, images_per_class=8, image_size=64,
                                                  workers=1, seed=5), progress=False)
    write_split(read_cub(root), 4, base / "split")
    return root, base / "split"


@pytest.fixture(scope="session")
def exported_models(tiny_cub, tmp_path_factory):
    """A tiny extractor and detector, exported as the pipeline loads them: (extractor dir, detector dir).

    No training (not the point of the tests that use them): the extractor is the pretrained
    backbone with a random projection; the detector has random weights but BatchNorm statistics
    warmed on real images, since an untrained network in eval mode outputs ~0.
    """
    import cv2
    import numpy as np
    import paddle

    from recipes import scratch

    from visrec.config import config_from_dict
    from visrec.imaging import load_image, normalize_chw
    from visrec.inference.detector_runtime import export_detector
    from visrec.inference.export import export_extractor
    from visrec.models.detector import build_detector
    from visrec.models.extractor import build_rec_model
    from visrec.training import detector as det_training
    from visrec.training import extractor_training as ext_training

    root, _ = tiny_cub
    out = tmp_path_factory.mktemp("exported")
    paddle.seed(0)
    images = sorted((root / "images").rglob("*.jpg"))[:16]

    def batch(size: int, mean, std) -> paddle.Tensor:
        arrays = [normalize_chw(cv2.resize(load_image(p), (size, size)), mean, std, 1 / 255) for p in images]
        return paddle.to_tensor(np.stack(arrays))

    # The extractor is the ImageNet EfficientNet-Lite0 (its BN statistics are ImageNet's) with a
    # random 32-d projection, at 64 px: small and fast, yet its embeddings tell images apart (a
    # random MobileNet maps every image to nearly the same vector, so matches would be ties).
    cfg = config_from_dict({
        "extractor": scratch("extractor", {
            "backbone": {"name": "efficientnet_lite0", "pretrained": "imagenet", "pool": "gem"},
            "neck": {"name": "FCNeck", "embedding_size": 32}, "image": {"size": 64}}),
        "detector": scratch("detector", {"neck_channels": 16, "head_convs": 1, "image": {"size": 64}}),
    })
    ext_cfg = ext_training.model_config(cfg.extractor, class_num=4)
    model = build_rec_model(ext_cfg["backbone"], ext_cfg["neck"], ext_cfg["head"], ext_cfg["class_num"])
    export_extractor(model, ext_cfg, out / "extractor", onnx=False)

    det_cfg = det_training.model_config(cfg.detector)
    detector = build_detector(det_cfg)
    detector.train()
    with paddle.no_grad():
        for _ in range(3):
            detector(batch(64, *det_training.normalization(cfg.detector)))
    export_detector(detector, det_cfg, out / "detector", onnx=False)
    return out / "extractor", out / "detector"


@pytest.fixture()
def pipeline_repo(tmp_path, exported_models, tiny_cub):
    """A repo folder holding what the pipeline leaves for the promotion gate: ``data/export``
    (both models) and ``data/gallery`` (2 images each of classes 1-3, labels ``class N``).
    Returns (repo, {class id: [image paths]})."""
    import shutil

    from visrec.data.cub import read_cub
    from visrec.inference.extractor_runtime import Extractor
    from visrec.inference.gallery_ops import GalleryItem, build_gallery

    root, _ = tiny_cub
    meta = read_cub(root)
    export = tmp_path / "data" / "export"
    for kind, src in zip(("extractor", "detector"), exported_models, strict=True):
        shutil.copytree(src, export / kind)
    images = {c: [meta.root / im.rel_path for im in meta.images if im.class_id == c] for c in range(1, 9)}
    items = [GalleryItem(p, f"class {c}") for c in (1, 2, 3) for p in images[c][:2]]
    build_gallery(Extractor(export / "extractor"), items, "FLAT", progress=False).save(tmp_path / "data" / "gallery")
    return tmp_path, images


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory):
    """A Milvus Lite server on 127.0.0.1 over a fresh data dir, shared by the session's tests
    (one start-up, ~2 s) and stopped at the end. Tests keep apart by their own aliases."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data_dir = tmp_path_factory.mktemp("milvus") / "milvus.db"
    log = open(data_dir.parent / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir),
                               "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                log_text = (data_dir.parent / "server.log").read_text()
                raise RuntimeError(f"Milvus Lite exited with {server.returncode}: {log_text}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("Milvus Lite did not listen within 60 s") from None
                time.sleep(0.1)
        yield uri
    finally:
        server.send_signal(signal.SIGINT)  # run_server closes the data dir on KeyboardInterrupt
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
