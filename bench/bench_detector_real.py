"""How well does a detector recipe trained on the embedded synthetic data find real objects?

Trains the detector of ``params.yaml`` (with ``-o`` overrides) on a generated synthetic set,
and after every epoch scores its first member, through the export, on the photos of the unseen classes of
a real CUB folder (AP50 / COCO mAP against CUB's boxes): as the export serves it (with the box
scale and centre prior the export stage adds, ``training.detector.detector_calibration``) and the
network's boxes alone; then trains one more member per ``detector.synthetic_styles`` entry (as the
pipeline does) and scores the whole detector. No real photo is used in training:
this is the out-of-the-box figure of issue #16.

    .venv/bin/python bench/bench_detector_real.py ../shared/data/cub_subset/CUB_200_2011
    .venv/bin/python bench/bench_detector_real.py CUB_DIR -o detector.epochs=3 -o data.synthetic.seed=1
    .venv/bin/python bench/bench_detector_real.py CUB_DIR --export data/detector   # score a finished run
    .venv/bin/python bench/bench_detector_real.py CUB_DIR --train-on-real   # trained on the real classes 1-25

The synthetic set is generated once per ``data.synthetic`` setting under ``--work`` and reused.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import tempfile
import time
from pathlib import Path

from visrec.config import load_config
from visrec.data.cub import CUB_DIRNAME, read_cub
from visrec.data.split import coco_for, write_split
from visrec.data.synthetic import generate
from visrec.inference.detector_runtime import exported_predict_fn
from visrec.data.scene_manifest import styles_for
from visrec.data.scenes import styled
from visrec.training.detector import (detector_calibration, evaluate_detector, load_trained, make_dataset,
                                      model_config, postprocess_params, train_detector, train_scene_members)
from visrec.utils.logs import setup_logging


def real_dataset(cfg, cub_dir: Path, train_classes: int, work: Path):
    meta = read_cub(cub_dir)
    unseen = set(meta.class_ids[train_classes:])
    coco, _ = coco_for(meta, [im for im in meta.images if im.class_id in unseen])
    path = work / f"real_{train_classes}.json"
    path.write_text(json.dumps(coco))
    dataset = make_dataset(cfg, cub_dir, path, train=False)
    dataset.preload()
    return dataset


def score(model, cfg, dataset, calibration: dict[str, float]) -> dict[str, float]:
    """AP50 / mAP of the network's own boxes and, under ``exported_``, of the boxes its export
    serves (``calibration``: the box scale and centre prior the export stage adds)."""
    model.eval()
    with tempfile.TemporaryDirectory(prefix="visrec-det-real-") as tmp:
        predict = exported_predict_fn(model, model_config(cfg, len(model.members)), Path(tmp) / "detector")
        outputs = []  # one network pass: the second post-processing replays its batches in order

        def recording(batch):
            outputs.append(predict(batch))
            return outputs[-1]

        metrics, _ = evaluate_detector(recording, dataset, cfg.eval_batch_size, postprocess_params(cfg))
        replay = iter(outputs)
        served, _ = evaluate_detector(lambda batch: next(replay), dataset, cfg.eval_batch_size,
                                      {**postprocess_params(cfg), **calibration})
    model.train()
    return {**metrics, **{f"exported_{k}": v for k, v in served.items()}}


def report(m: dict[str, float]) -> str:
    return (f"real AP50 {m['exported_det_AP50']:.3f}  mAP {m['exported_det_mAP']:.3f} as exported "
            f"(network alone: AP50 {m['det_AP50']:.3f}  mAP {m['det_mAP']:.3f})")


def synthetic_set(cfg, work: Path) -> tuple[Path, Path]:
    """(raw root, split dir) of the generated set for ``cfg.data.synthetic`` (cached by its settings)."""
    key = hashlib.sha1(json.dumps([dataclasses.asdict(cfg.data.synthetic), cfg.split.train_classes],
                                  sort_keys=True).encode()).hexdigest()[:10]
    base = work / f"synthetic-{key}"
    split_dir = base / "split"
    if not (split_dir / "train_coco.json").exists():
        root = generate(base, cfg.data.synthetic)
        write_split(read_cub(root), cfg.split.train_classes, split_dir)
    return base / CUB_DIRNAME, split_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cub_dir", type=Path, help="a real CUB_200_2011 folder (images.txt, bounding_boxes.txt, ...)")
    parser.add_argument("--train-classes", type=int, default=25, help="the first N classes are not scored")
    parser.add_argument("--export", type=Path, help="score this finished detector run instead of training")
    parser.add_argument("--train-on-real", action="store_true",
                        help="train on the first --train-classes classes of CUB_DIR (the real-data run) "
                             "instead of the synthetic set")
    parser.add_argument("--run-dir", type=Path, help="keep the training run here (default: a temporary folder)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "visrec-bench-detector")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("-o", "--override", action="append", default=[])
    args = parser.parse_args()
    setup_logging("WARNING")
    cfg = load_config(args.params, args.override)
    det = cfg.detector
    args.work.mkdir(parents=True, exist_ok=True)
    real = real_dataset(det, args.cub_dir, args.train_classes, args.work)
    print(f"{len(real)} real photos of the unseen classes of {args.cub_dir}; overrides {args.override or 'none'}")
    # what the export stage would add: a detector trained on real boxes gets no calibration
    calibration = detector_calibration(det, generated=not args.train_on_real)
    print(f"export calibration {calibration}")
    if args.export:
        model, _ = load_trained(args.export)
        print(report(score(model, det, real, calibration)))
        return
    if args.train_on_real:
        raw_root, split_dir = args.cub_dir, args.work / f"real-split-{args.train_classes}"
        if not (split_dir / "train_coco.json").exists():
            write_split(read_cub(args.cub_dir), args.train_classes, split_dir)
    else:
        raw_root, split_dir = synthetic_set(cfg, args.work)
    start = time.perf_counter()
    rows = []

    def after_epoch(epoch: int, row: dict, model):
        m = score(model, det, real, calibration)
        rows.append((epoch, m["exported_det_AP50"], m["det_AP50"]))
        print(f"epoch {epoch}: {report(m)}  ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)

    with tempfile.TemporaryDirectory(prefix="visrec-det-run-") as tmp:
        run_dir = args.run_dir or Path(tmp)
        model, _, _ = train_detector(det, raw_root, split_dir, run_dir, epoch_callback=after_epoch)
        best = max(rows, key=lambda r: r[1])
        print(f"first member: best real AP50 as exported {best[1]:.3f} at epoch {best[0]}; last {rows[-1][1]:.3f} "
              f"(network alone {rows[-1][2]:.3f})")
        styles = [] if args.train_on_real else styles_for(cfg.data, det.synthetic_styles)
        if styles:  # what the pipeline publishes: one more member per generated scene style
            scene_sets = [synthetic_set(dataclasses.replace(cfg, data=dataclasses.replace(
                cfg.data, synthetic=styled(cfg.data.synthetic, style, i))), args.work) for i, style in enumerate(styles)]
            ensemble, _ = train_scene_members(det, model, scene_sets, run_dir)
            print(f"all {len(ensemble.members)} members: {report(score(ensemble, det, real, calibration))} "
                  f"({(time.perf_counter() - start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
