"""Stage `validate`: Great Expectations suite over the split manifests, GX data docs, data report."""

from pathlib import Path

from visrec.config import Config
from visrec.data.cub import CUB_DIRNAME, read_cub
from visrec.data.manifest import build_manifest
from visrec.data.validation import validate_manifest, write_outputs
from visrec.utils.fs import atomic_dir, write_json
from visrec.workflows.stage_runner import StageError, main


def validate(cfg: Config) -> None:
    raw_root = Path(cfg.paths.raw) / CUB_DIRNAME
    num_classes = len(read_cub(raw_root).classes)
    manifest = build_manifest(raw_root, Path(cfg.paths.split), num_workers=cfg.runtime.num_threads)
    result = validate_manifest(manifest, cfg.validate, num_classes)
    if not result.success:
        # The last good outputs stay in place; the failing run is kept beside them to inspect.
        failed_dir = Path(f"{cfg.paths.validate}.failed")
        with atomic_dir(failed_dir) as out:
            write_outputs(result, manifest, raw_root, out, cfg.validate)
        raise StageError(f"data validation failed (details in {failed_dir}/):\n{result.summary()}")
    with atomic_dir(cfg.paths.validate) as out:
        metrics = write_outputs(result, manifest, raw_root, out, cfg.validate)
    write_json(Path(cfg.paths.metrics) / "validate.json", metrics)


if __name__ == "__main__":
    main("validate", validate)
