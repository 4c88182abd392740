"""Run under `python -m paddle.distributed.launch --nproc_per_node 2`: tiny DataParallel training.

Each rank saves its trainable parameters so the test can check they are identical.
"""

import sys
from pathlib import Path

import numpy as np
import paddle

from visrec.config import config_from_dict
from visrec.training.extractor_training import train_extractor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the training recipes
from recipes import scratch  # noqa: E402

if __name__ == "__main__":
    raw, split, out = (Path(a) for a in sys.argv[1:4])
    cfg = config_from_dict({"extractor": scratch("extractor", {
        "backbone": {"name": "mobilenet_v1", "scale": 0.25},
        "neck": {"name": "FCNeck", "embedding_size": 32},
        "image": {"size": 48},
        "sampler": {"classes_per_batch": 2, "images_per_class": 4},
        "epochs": 2, "eval_every": 2, "eval_batch_size": 16, "seed": 3,
    })}).extractor
    model, _ = train_extractor(cfg, raw, split, out)
    rank = paddle.distributed.get_rank()
    params = {name: p.numpy() for name, p in model.named_parameters() if not p.stop_gradient}
    np.savez(out / f"rank{rank}_params.npz", **params)
    print(f"rank {rank} of {paddle.distributed.get_world_size()} done")
