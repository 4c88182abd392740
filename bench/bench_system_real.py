"""The whole recognition system on real photos, as a user meets it.

Takes the unseen classes of a CUB_200_2011 folder (classes after the first ``--train-classes``),
builds a gallery of ``--gallery-per-class`` whole photos per class with the code of
``visrec gallery build`` (the served models: the champion, else the pipeline's latest export,
or ``--extractor`` / ``--detector``), then recognises every other photo of those classes with
the code of ``visrec recognize`` and prints:

- top-1: the label of each photo's best-scoring result, before any threshold;
- the share of photos the served threshold would reject (no result at all): a gallery built from a
  list carries no calibration, so it is ``recognition.score_threshold``, else ``default_threshold``;
- ms per photo: decode + detect + embed + search + the rest (``summary.json`` splits it);
- the detector's AP50 / COCO mAP on the query photos (pycocotools, CUB's boxes);
- the same flow with the whole photo only (``--no-whole-only`` skips it), for the cost and
  quality of the detector;
- per-class top-1 in ``<work>/per_class_top1.csv`` and ``.png``.

    .venv/bin/python bench/bench_system_real.py ../shared/data/cub_subset/CUB_200_2011 \\
        --train-classes 25 --gallery-per-class 5
    .venv/bin/python bench/bench_system_real.py DIR --extractor data/export/extractor -o recognition.class_top_m=1
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from visrec.config import load_config
from visrec.data.cub import read_cub
from visrec.imaging import load_image
from visrec.data.split import coco_for
from visrec.evaluation.system_eval import class_label
from visrec.index.faiss_index import index_params
from visrec.inference.extractor_runtime import Extractor
from visrec.inference.gallery_ops import GalleryItem, build_gallery
from visrec.inference.pipeline import RecognitionSystem, load_detector
from visrec.metrics.detection import coco_detection_metrics
from visrec.workflows.champion import served_recognition
from visrec.utils.logs import setup_logging


def pick(cub_dir: Path, train_classes: int, per_class: int, seed: int):
    """(gallery items, query (path, label) pairs, query CubImages) of the unseen classes."""
    meta = read_cub(cub_dir)
    unseen = meta.class_ids[train_classes:]
    if not unseen:
        raise SystemExit(f"error: {cub_dir} has {len(meta.class_ids)} classes; --train-classes leaves none unseen")
    rng = np.random.default_rng(seed)
    by_class = defaultdict(list)
    for image in meta.images:
        by_class[image.class_id].append(image)
    gallery, queries = [], []
    for class_id in unseen:
        images = sorted(by_class[class_id], key=lambda im: im.image_id)
        order = rng.permutation(len(images))
        label = class_label(meta.classes[class_id])
        gallery += [GalleryItem(cub_dir / images[i].rel_path, label) for i in order[:per_class]]
        queries += [(images[i], label) for i in order[per_class:]]
    return meta, gallery, queries


def run_system(cfg, rec, gallery_items, queries, cub_dir: Path, progress: bool) -> dict:
    """Gallery build + recognition of every query with one recognition config."""
    # The models are loaded once: the gallery is built with the very extractor and detector
    # that then recognise (what `visrec gallery build` + `visrec recognize` load, each once).
    extractor = Extractor(rec.extractor, backend=rec.backend, num_threads=rec.num_threads)
    detector = load_detector(rec)
    start = time.perf_counter()
    gallery = build_gallery(
        extractor, gallery_items, cfg.index.index_type, rec.num_threads, cfg.index.batch_size, progress=progress,
        meta_extra={"source": "bench_system_real"}, views=rec.gallery_views,
        detector=detector if "object" in rec.gallery_views else None, **index_params(cfg.index))
    build_s = time.perf_counter() - start
    system = RecognitionSystem(extractor, gallery, detector, rec)
    threshold = system.threshold  # what `visrec recognize` applies after `visrec gallery build`
    rows, wall = [], 0.0
    for image, label in tqdm(queries, desc="recognising", disable=not progress, leave=False):
        start = time.perf_counter()
        array = load_image(cub_dir / image.rel_path)
        results = system.predict(array, threshold=-2.0)  # every result: the threshold is applied below
        wall += time.perf_counter() - start
        best = results[0] if results else None
        rows.append({"image_id": image.image_id, "class_id": image.class_id, "label": label,
                     "predicted": best["rec_docs"] if best else None,
                     "score": best["rec_scores"] if best else -2.0})
    timings = system.timings.as_dict()
    correct = [r["predicted"] == r["label"] for r in rows]
    return {"rows": rows, "top1": float(np.mean(correct)), "threshold": threshold,
            "rejected": float(np.mean([r["score"] < threshold for r in rows])),
            "ms_per_photo": 1000 * wall / max(1, len(rows)),
            "ms_split": {k: round(1000 * timings[k] / max(1, timings["images"]), 2)
                         for k in ("detect", "extract", "search", "rest")},
            "boxes_per_photo": timings["boxes"] / max(1, timings["images"]),
            "gallery_entries": len(gallery), "gallery_build_s": build_s}


def detector_ap(rec, meta, queries, cub_dir: Path, progress: bool) -> dict:
    # the detector's own max_det (model.json), every score: AP needs the whole ranking
    from visrec.inference.detector_runtime import Detector

    detector = Detector(rec.detector, backend=rec.backend, num_threads=rec.num_threads, score_threshold=0.0,
                        box_scale=rec.det_box_scale, center_prior=rec.det_center_prior,
                        extent_blend=rec.det_extent_blend)
    coco, _ = coco_for(meta, [image for image, _ in queries])
    detections = {}
    for start in tqdm(range(0, len(queries), 32), desc="detector AP", disable=not progress, leave=False):
        chunk = [image for image, _ in queries[start:start + 32]]
        for image, dets in zip(chunk, detector.detect_arrays([load_image(cub_dir / im.rel_path) for im in chunk]),
                               strict=True):
            detections[image.image_id] = dets
    return coco_detection_metrics(coco, detections)


def write_per_class(work: Path, runs: dict[str, dict]) -> Path:
    per_class: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for name, run in runs.items():
        for r in run["rows"]:
            per_class[r["label"]][name].append(r["predicted"] == r["label"])
    names = list(runs)
    labels = sorted(per_class, key=lambda lab: np.mean(per_class[lab][names[0]]))
    with (work / "per_class_top1.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "queries", *names])
        for lab in labels:
            writer.writerow([lab, len(per_class[lab][names[0]]),
                             *[round(float(np.mean(per_class[lab][n])), 4) for n in names]])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.28 * len(labels) + 1.5))
    y = np.arange(len(labels))
    height = 0.8 / len(names)
    for k, name in enumerate(names):
        ax.barh(y + k * height, [np.mean(per_class[lab][name]) for lab in labels], height, label=name)
    ax.set_yticks(y + 0.4 - height / 2, labels, fontsize=7)
    ax.set_xlabel("top-1 on real photos")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = work / "per_class_top1.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cub_dir", type=Path, help="a CUB_200_2011 folder (images.txt, images/, ...)")
    parser.add_argument("--train-classes", type=int, default=25, help="the first N classes are not used")
    parser.add_argument("--gallery-per-class", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="which photos go to the gallery")
    parser.add_argument("--extractor", help="an extractor export (default: the served one)")
    parser.add_argument("--detector", help="a detector export (default: the served one)")
    parser.add_argument("--no-whole-only", action="store_true", help="skip the whole-photo-only run")
    parser.add_argument("--work", type=Path, default=None, help="CSV and plot go here (default: a temp folder)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("-o", "--override", action="append", default=[])
    args = parser.parse_args()
    setup_logging("WARNING")
    cfg = load_config(args.params, args.override)
    rec, champion = served_recognition(cfg, args.params.resolve().parent)
    if args.extractor:
        rec = dataclasses.replace(rec, extractor=args.extractor)
    if args.detector:
        rec = dataclasses.replace(rec, detector=args.detector)
    work = args.work or Path(tempfile.mkdtemp(prefix="visrec-system-real-"))
    work.mkdir(parents=True, exist_ok=True)
    meta, gallery_items, queries = pick(args.cub_dir, args.train_classes, args.gallery_per_class, args.seed)
    print(f"models: {'champion ' + champion if champion else 'pipeline export'}: extractor {rec.extractor}, "
          f"detector {rec.detector}; {len(gallery_items)} gallery photos, {len(queries)} queries, "
          f"{len(meta.class_ids) - args.train_classes} classes")

    runs = {}
    if rec.detector:
        runs["detector + whole photo"] = run_system(cfg, rec, gallery_items, queries, args.cub_dir, True)
    if not rec.detector or not args.no_whole_only:
        runs["whole photo only"] = run_system(cfg, dataclasses.replace(rec, detector=None), gallery_items, queries,
                                              args.cub_dir, True)
    print(f"\n{'setting':<24} {'top-1':>6} {'rejected':>9} {'ms/photo':>9} {'boxes':>6} {'entries':>8} "
          f"{'build s':>8}")
    for name, run in runs.items():
        print(f"{name:<24} {run['top1']:6.3f} {run['rejected']:9.3f} {run['ms_per_photo']:9.1f} "
              f"{run['boxes_per_photo']:6.2f} {run['gallery_entries']:8d} {run['gallery_build_s']:8.1f}")
    print(f"(rejected: best score under the threshold the new gallery is served with, "
          f"{next(iter(runs.values()))['threshold']:.3f}: recognition.score_threshold, else default_threshold)")
    if rec.detector:
        det = detector_ap(rec, meta, queries, args.cub_dir, True)
        print(f"detector on the {len(queries)} query photos: AP50 {det['det_AP50']:.3f}, "
              f"COCO mAP {det['det_mAP']:.3f}, recall@0.5 {det['det_recall50']:.3f}")
    plot = write_per_class(work, runs)
    summary = {name: {k: v for k, v in run.items() if k != "rows"} for name, run in runs.items()}
    if rec.detector:
        summary["detector"] = det
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"per-class top-1: {work / 'per_class_top1.csv'}, {plot}")


if __name__ == "__main__":
    main()
