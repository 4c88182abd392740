"""Gallery building speed: views/s through ``embed_items`` against the extractor alone.

Every gallery path (``build_index``, ``visrec gallery build/add``, the service, the DAG) embeds
through ``visrec.inference.gallery_ops.embed_items``: each file decoded once for all its views,
the next batch prepared on a second thread while the model embeds the current one. This prints
its views/s beside the extractor's own rate on the same photos already decoded and preprocessed
(the ceiling), alternating the two ``--rounds`` times.

    make repro
    .venv/bin/python bench/bench_gallery_build.py ../shared/data/cub_subset/CUB_200_2011/images --photos 400
    .venv/bin/python bench/bench_gallery_build.py PHOTOS --photos 60 --upscale 4000x3000   # phone-sized photos
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2

from bench_service_overhead import pick_photos
from visrec.config import load_config
from visrec.imaging import load_image
from visrec.inference.gallery_ops import GalleryItem, embed_items, preprocess_items
from visrec.inference.pipeline import load_extractor


def upscaled_copies(photos: list[Path], size: tuple[int, int], folder: Path) -> list[Path]:
    """JPEG copies of ``photos`` resized to ``size`` (quality 90): what a phone camera hands over."""
    copies = []
    for i, photo in enumerate(photos):
        target = folder / f"{i:05d}.jpg"
        image = cv2.resize(cv2.imread(str(photo)), size, interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(target), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        copies.append(target)
    return copies


def views_of(photos: list[Path]) -> list[GalleryItem]:
    """Both gallery views of each photo: the whole photo and a centred box over 60 % of each side."""
    items = []
    for photo in photos:
        height, width = load_image(photo).shape[:2]
        box = (0.2 * width, 0.2 * height, 0.8 * width, 0.8 * height)
        items += [GalleryItem(photo, "x"), GalleryItem(photo, "x", box)]
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos_dir", type=Path, help="a folder of photos (searched recursively)")
    parser.add_argument("--photos", type=int, default=400)
    parser.add_argument("--upscale", default=None, help="WxH: embed resized JPEG copies instead (e.g. 4000x3000)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--params", type=Path, default=Path(__file__).resolve().parents[1] / "params.yaml")
    args = parser.parse_args()

    extractor = load_extractor(load_config(args.params).recognition)
    photos = pick_photos(args.photos_dir, args.photos)
    with tempfile.TemporaryDirectory(prefix="visrec-gallery-bench-") as tmp:
        if args.upscale:
            width, height = (int(v) for v in args.upscale.lower().split("x"))
            photos = upscaled_copies(photos, (width, height), Path(tmp))
        items = views_of(photos)
        ready = preprocess_items(extractor, items)  # the ceiling: decoding and preprocessing done
        embed_items(extractor, items[:64], progress=False)  # warm-up
        built, model = [], []
        for round_no in range(1, args.rounds + 1):
            start = time.perf_counter()
            embed_items(extractor, items, progress=False)
            built.append(len(items) / (time.perf_counter() - start))
            start = time.perf_counter()
            for first in range(0, len(ready), extractor.batch_size):
                extractor.embed_batch(ready[first:first + extractor.batch_size])
            model.append(len(items) / (time.perf_counter() - start))
            print(f"round {round_no}: embed_items {built[-1]:.1f} views/s; the extractor alone on ready input "
                  f"{model[-1]:.1f} views/s", flush=True)
        shape = load_image(photos[0]).shape
    print(f"\n{len(photos)} photos (the first {shape[1]} x {shape[0]} px), {len(items)} views: median embed_items "
          f"{statistics.median(built):.1f} views/s = {statistics.median(built) / statistics.median(model):.2f}x "
          f"the extractor alone ({statistics.median(model):.1f}, {extractor.batch_size} views a call)")


if __name__ == "__main__":
    sys.exit(main())
