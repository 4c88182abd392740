"""The ``build_index`` stage's work: the gallery of the unseen classes, and its rejection threshold.

Outputs: the gallery directory (``recognition.gallery``) with the calibrated threshold in its
metadata, and ``paths.index`` holding ``gallery_list.txt`` (the gallery as a list file that
``visrec gallery build`` accepts), ``queries.jsonl`` (the held-back queries, for ``evaluate``)
and ``calibration.json``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from visrec.data.cub import read_cub
from visrec.data.split_list import read_split_list
from visrec.evaluation.system_eval import (QUERIES_FILE, SystemSplit, calibrate, open_set_gallery, split_for_system,
                                           write_queries)
from visrec.index.factory import gallery_from_vectors
from visrec.index.faiss_index import index_params
from visrec.index.gallery import Gallery
from visrec.index.listfile import write_list_file
from visrec.inference.gallery_ops import embed_items, expand_views, item_metadata
from visrec.inference.pipeline import RecognitionSystem, load_extractor
from visrec.utils.fs import write_json

logger = logging.getLogger(__name__)

GALLERY_LIST, CALIBRATION_FILE = "gallery_list.txt", "calibration.json"


def run_build_index(cfg, raw_root: Path, split_dir: Path, index_dir: Path, metrics_file: Path) -> dict[str, Any]:
    """Embed the gallery, calibrate the threshold on the calibration queries, save everything."""
    index_cfg, rec_cfg = cfg.index, cfg.recognition
    meta = read_cub(raw_root)
    test_ids = {e.unique_id for e in read_split_list(Path(split_dir) / "test_list.txt")}
    split: SystemSplit = split_for_system(meta, test_ids, index_cfg.gallery_per_class, index_cfg.open_set_fraction,
                                          index_cfg.calibration_fraction, index_cfg.seed)
    extractor = load_extractor(rec_cfg)
    entries = expand_views(split.gallery, rec_cfg.gallery_views)  # the known boxes are the object views
    vectors = embed_items(extractor, entries, index_cfg.batch_size)
    labels = [item.label for item in entries]
    metadata = [item_metadata(item) for item in entries]
    gallery = gallery_from_vectors(index_cfg, vectors, labels, metadata, fingerprint=extractor.fingerprint,
                                   num_threads=rec_cfg.num_threads)
    # The open-set copy only calibrates the threshold: an in-memory Faiss index of the same type.
    gallery_open = open_set_gallery(Gallery.build(vectors, labels, metadata, index_type=index_cfg.index_type,
                                                  fingerprint=extractor.fingerprint, num_threads=rec_cfg.num_threads,
                                                  **index_params(index_cfg)), split.held_out)
    try:
        system = RecognitionSystem.from_config(rec_cfg, gallery=gallery)
        calibration = calibrate(system, split, gallery_open)
    except BaseException:
        gallery.release()  # an unpublished Milvus collection
        raise
    gallery.meta_extra.update({"threshold": calibration["threshold"], "held_out_labels": split.held_out,
                               "calibration": calibration, "source": "build_index: test split of " + str(raw_root)})

    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    rel = [os.path.relpath(item.path, index_dir) for item in split.gallery]
    write_list_file(index_dir / GALLERY_LIST, zip(rel, [item.label for item in split.gallery], strict=True),
                    delimiter=index_cfg.delimiter)
    write_queries(index_dir / QUERIES_FILE, split.queries)
    write_json(index_dir / CALIBRATION_FILE, calibration)
    gallery.save(rec_cfg.gallery)
    summary = {"gallery_images": len(split.gallery), "gallery_entries": len(gallery),
               "gallery_labels": len(gallery.labels()),
               "queries": len(split.queries), "held_out_labels": len(split.held_out),
               "index_type": index_cfg.index_type, **calibration}
    write_json(metrics_file, summary)
    logger.info("gallery %s: %d images of %d labels (%s), threshold %.4f", rec_cfg.gallery, len(gallery),
                len(gallery.labels()), index_cfg.index_type, calibration["threshold"])
    return summary
