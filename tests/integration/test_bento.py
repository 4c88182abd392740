"""`make bento`'s build (bento/bentofile.yaml) into a temporary BENTOML_HOME, then the built Bento served once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from .test_service import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BENTOML = Path(sys.executable).with_name("bentoml")


def test_the_bento_builds_and_answers_recognize(exported_models, tiny_cub, tmp_path):
    from visrec.inference.extractor_runtime import Extractor
    from visrec.inference.gallery_ops import GalleryItem, build_gallery

    # A build context laid out like the repository after `make repro`, with the tiny models.
    ctx = tmp_path / "ctx"
    shutil.copytree(REPO / "bento", ctx / "bento", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "src" / "visrec", ctx / "src" / "visrec", ignore=shutil.ignore_patterns("__pycache__"))
    for kind, src in zip(("extractor", "detector"), exported_models, strict=True):
        shutil.copytree(src, ctx / "data" / "export" / kind)
    root, _ = tiny_cub
    first = sorted((root / "images").rglob("*.jpg"))[0]
    build_gallery(Extractor(ctx / "data" / "export" / "extractor"), [GalleryItem(first, "seed")], "FLAT",
                  progress=False).save(ctx / "data" / "gallery")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["recognition"].update({"score_threshold": 0.0})
    (ctx / "params.yaml").write_text(yaml.safe_dump(params))

    # As `make bento` runs it: uv (which BentoML runs while building) from .tools/bin, after the env's own PATH
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}:{REPO / '.tools' / 'bin'}"}
    build = subprocess.run([str(BENTOML), "build", "-f", "bento/bentofile.yaml", "."], cwd=ctx, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    bentos = list((tmp_path / "home" / "bentos" / "visrec").iterdir())
    assert bentos, "no bento under BENTOML_HOME"

    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    serve_env = {**env, "VISREC_ADMIN_TOKEN": "t", "PYTHONPATH": ""}
    serve_env.pop("VISREC_PARAMS", None)
    proc = subprocess.Popen([str(BENTOML), "serve", "visrec:latest", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=tmp_path, env=serve_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-4000:]
            time.sleep(0.5)
        resp = requests.post(f"{url}/recognize", files={"image": ("q.jpg", first.read_bytes())}, timeout=60)
        assert resp.status_code == 200 and resp.json()["results"], resp.text
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()
