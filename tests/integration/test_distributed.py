"""DataParallel on 2 CPU processes (gloo): both ranks end with identical weights."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_process_data_parallel_keeps_ranks_identical(tiny_cub, tmp_path):
    raw, split = tiny_cub
    script = Path(__file__).with_name("dist_train_tiny.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PADDLE_", "FLAGS_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
         "--log_dir", str(tmp_path / "logs"), str(script), str(raw), str(split), str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=600)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((tmp_path / "logs").glob("*")) if p.is_file())
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n{logs}"
    rank0 = np.load(tmp_path / "run" / "rank0_params.npz")
    rank1 = np.load(tmp_path / "run" / "rank1_params.npz")
    assert set(rank0.files) == set(rank1.files) and rank0.files
    for name in rank0.files:
        np.testing.assert_allclose(rank0[name], rank1[name], rtol=0, atol=1e-6, err_msg=name)
    # checkpoints are written by rank 0 only, and training really ran 2 epochs
    assert (tmp_path / "run" / "checkpoints" / "epoch_2").exists()
    assert "world size 2" in logs or "rank 1 of 2 done" in logs
