"""The ``validate`` stage logic: the manifest of the split's images, checked by Great Expectations.

The manifest (:func:`visrec.data.manifest.build_manifest`) opens every image the split lists
(exists? decodes? size? box inside?); ``validate_manifest`` runs a Great Expectations 1.x suite over that table and two small
aggregates of it (per class, per file content), and ``write_outputs`` writes the results,
GX data docs and the data report. Each check is a named rule; a failed rule is reported
with a few offending rows so the message says what to fix.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from visrec.config import ValidateConfig
from visrec.data.cub import resolve_root
from visrec.data.manifest import MANIFEST_COLUMNS, SPLITS
from visrec.data.report import write_report
from visrec.data.validation_result import ValidationResult
from visrec.utils.fs import write_json

logger = logging.getLogger(__name__)

# Paddle installs an INFO root handler; without this GX prints ~200 "Skipping registering"
# lines when it is imported. Only GX's own logger is touched, never the root logger.
logging.getLogger("great_expectations").setLevel(logging.WARNING)

# Rule name -> what it checks (also the order rules are reported in).
RULES: dict[str, str] = {
    "splits_nonempty": "both train and test lists have images",
    "file_decodes": "every listed file exists and decodes as an image",
    "min_size": "decodable images are at least min_width x min_height pixels",
    "label_in_range": "labels are class ids between 1 and the number of classes",
    "unique_id_unique": "unique ids are unique across both splits",
    "box_nonempty": "every image has a bounding box with positive width and height",
    "box_inside_image": "boxes reach past the image edge by at most max_box_overshoot of its side",
    "min_per_class": "every (in-range) class has at least min_per_class images",
    "classes_disjoint": "no class appears in both train and test",
    "no_cross_split_duplicates": "no identical image file appears in both train and test",
}

# Columns GX copies into each offending row it reports, per validated table.
_IMAGE_ID_COLUMNS = ["row", "split", "path", "label", "unique_id"]
_CLASS_ID_COLUMNS = ["label", "splits"]
_HASH_ID_COLUMNS = ["content_hash", "files"]


# ----------------------------------------------------------------------------- aggregates


def _image_table(manifest: pd.DataFrame) -> pd.DataFrame:
    table = manifest.reset_index(drop=True).copy()
    table.insert(0, "row", np.arange(len(table)))
    return table


def _class_table(manifest: pd.DataFrame, num_classes: int) -> pd.DataFrame:
    """Per label: image count, how many splits it appears in, whether it is a valid class id."""
    table = manifest.groupby("label").agg(
        n_images=("split", "size"),
        n_splits=("split", "nunique"),
        splits=("split", lambda s: "+".join(sorted(set(s), key=SPLITS.index))),
    ).reset_index()
    table["in_range"] = table["label"].between(1, num_classes)
    return table


def _hash_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Per file content (sha1): how many splits it appears in and which files carry it."""
    readable = manifest.loc[manifest["content_hash"] != "", ["content_hash", "split", "path"]]
    readable = readable.assign(file=readable["split"] + ":" + readable["path"])
    return readable.groupby("content_hash").agg(
        n_images=("file", "size"),
        n_splits=("split", "nunique"),
        files=("file", " | ".join),
    ).reset_index()


# ----------------------------------------------------------------------------- GX suites


def _import_gx() -> Any:
    """Import GX lazily (it takes ~10 s) and keep its INFO chatter out of the stage log."""
    import great_expectations as gx

    # GX pins this one logger to INFO at import ("Created temporary directory ..." per context).
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    return gx


def _suites(cfg: ValidateConfig, num_classes: int) -> dict[str, list[Any]]:
    """Expectations per validated table; each carries ``meta={"rule": name}``."""
    gx = _import_gx()
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations

    def rule(name: str) -> dict[str, str]:
        return {"rule": name}

    decodable = Column("decodes") == True  # noqa: E712 (builds a GX condition, not a comparison)
    return {
        "images": [
            E.ExpectColumnDistinctValuesToContainSet(column="split", value_set=list(SPLITS),
                                                     meta=rule("splits_nonempty")),
            E.ExpectColumnValuesToBeInSet(column="exists", value_set=[True], meta=rule("file_decodes")),
            E.ExpectColumnValuesToBeInSet(column="decodes", value_set=[True], meta=rule("file_decodes")),
            E.ExpectColumnValuesToBeBetween(column="width", min_value=cfg.min_width,
                                            row_condition=decodable, meta=rule("min_size")),
            E.ExpectColumnValuesToBeBetween(column="height", min_value=cfg.min_height,
                                            row_condition=decodable, meta=rule("min_size")),
            E.ExpectColumnValuesToBeBetween(column="label", min_value=1, max_value=num_classes,
                                            meta=rule("label_in_range")),
            E.ExpectColumnValuesToBeUnique(column="unique_id", meta=rule("unique_id_unique")),
            E.ExpectColumnValuesToNotBeNull(column="box_w", meta=rule("box_nonempty")),
            E.ExpectColumnValuesToBeBetween(column="box_w", min_value=0, strict_min=True,
                                            meta=rule("box_nonempty")),
            E.ExpectColumnValuesToBeBetween(column="box_h", min_value=0, strict_min=True,
                                            meta=rule("box_nonempty")),
            # NaN overshoot (no box, or image not decodable) is left to the rules above.
            E.ExpectColumnValuesToBeBetween(column="box_overshoot", max_value=cfg.max_box_overshoot,
                                            meta=rule("box_inside_image")),
        ],
        "classes": [
            # Out-of-range labels are label_in_range's failure; not counted twice here.
            E.ExpectColumnValuesToBeBetween(column="n_images", min_value=cfg.min_per_class,
                                            row_condition=Column("in_range") == True,  # noqa: E712
                                            meta=rule("min_per_class")),
            E.ExpectColumnValuesToBeBetween(column="n_splits", max_value=1,
                                            meta=rule("classes_disjoint")),
        ],
        "hashes": [
            E.ExpectColumnValuesToBeBetween(column="n_splits", max_value=1,
                                            meta=rule("no_cross_split_duplicates")),
        ],
    }


_ID_COLUMNS = {"images": _IMAGE_ID_COLUMNS, "classes": _CLASS_ID_COLUMNS, "hashes": _HASH_ID_COLUMNS}


def _run_gx(tables: dict[str, pd.DataFrame], cfg: ValidateConfig, num_classes: int) -> tuple[Any, dict]:
    """Run one suite per table in a fresh ephemeral context; return (context, JSON results)."""
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = context.data_sources.add_pandas("visrec")
    results: dict[str, dict] = {}
    for name, expectations in _suites(cfg, num_classes).items():
        batch_definition = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(gx.ExpectationSuite(name=f"visrec_{name}", expectations=expectations))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"visrec_{name}", data=batch_definition, suite=suite))
        # COMPLETE + index columns: every offending row comes back identified by these columns.
        result = definition.run(
            batch_parameters={"dataframe": tables[name]},
            result_format={"result_format": "COMPLETE",
                           "unexpected_index_column_names": _ID_COLUMNS[name]},
        )
        results[name] = jsonable(result.to_json_dict())
    return context, results


# ----------------------------------------------------------------------------- results


def jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars unwrapped, NaN/inf -> None, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _example(row: dict[str, Any]) -> dict[str, Any]:
    """Identifying columns first, then the offending values; the internal row number dropped."""
    ids = [c for c in (*_IMAGE_ID_COLUMNS, *_CLASS_ID_COLUMNS, *_HASH_ID_COLUMNS) if c in row and c != "row"]
    return {**{c: row[c] for c in ids}, **{k: v for k, v in row.items() if k not in ids and k != "row"}}


def _rules_from_gx(gx_result: dict[str, dict], max_rows: int) -> list[dict[str, Any]]:
    """Fold expectation results into one entry per rule (rows deduplicated across expectations)."""
    acc: dict[str, dict[str, Any]] = {
        name: {"success": True, "rows": {}, "observed": [], "missing": [], "errors": []} for name in RULES
    }
    for table, result in gx_result.items():
        for item in result["results"]:
            config = item["expectation_config"]
            name = (config.get("meta") or {}).get("rule")
            if name not in acc:
                continue
            entry = acc[name]
            entry["success"] &= bool(item["success"])
            exception = item.get("exception_info") or {}
            if exception.get("raised_exception"):
                entry["errors"].append(exception.get("exception_message"))
            if item["success"]:
                continue
            res = item.get("result") or {}
            for row in res.get("unexpected_index_list") or []:
                # Key on the table's identifying columns; merge the tested values of each rule.
                key = (table, tuple(row.get(c) for c in _ID_COLUMNS[table]))
                entry["rows"].setdefault(key, {}).update(row)
            if res.get("observed_value") is not None:
                entry["observed"].append(res["observed_value"])
            entry["missing"].extend(res.get("partial_missing_list") or [])
    rules = []
    for name, entry in acc.items():
        examples = [_example(row) for row in list(entry["rows"].values())[:max_rows]]
        rule = {"rule": name, "description": RULES[name], "success": entry["success"],
                "unexpected_count": len(entry["rows"]), "examples": examples}
        if entry["observed"] and not entry["success"]:
            rule["observed"] = entry["observed"][0] if len(entry["observed"]) == 1 else entry["observed"]
        if entry["missing"]:  # values a set expectation wanted but did not find
            rule["missing"] = entry["missing"]
        if entry["errors"]:
            rule["error"] = "; ".join(str(e) for e in entry["errors"])
        rules.append(rule)
    return rules


def _per_class_range(counts: pd.Series) -> dict[str, float]:
    if counts.empty:
        return {"min": 0, "median": 0, "max": 0}
    return {"min": int(counts.min()), "median": float(counts.median()), "max": int(counts.max())}


def manifest_stats(manifest: pd.DataFrame, cfg: ValidateConfig) -> dict[str, Any]:
    """Counts for the result, the metrics and the report."""
    overshoot = manifest["box_overshoot"]
    stats: dict[str, Any] = {
        "images": int(len(manifest)),
        "classes": int(manifest["label"].nunique()),
    }
    for split in SPLITS:
        part = manifest[manifest["split"] == split]
        stats[f"{split}_images"] = int(len(part))
        stats[f"{split}_classes"] = int(part["label"].nunique())
    hashes = manifest.loc[manifest["content_hash"] != "", "content_hash"]
    stats.update(
        boxes_clipped=int(((overshoot > 0) & (overshoot <= cfg.max_box_overshoot)).sum()),
        max_box_overshoot=float(overshoot.max()) if overshoot.notna().any() else 0.0,
        greyscale_images=int((manifest["decodes"] & (manifest["channels"] == 1)).sum()),
        missing_files=int((~manifest["exists"]).sum()),
        undecodable_files=int((manifest["exists"] & ~manifest["decodes"]).sum()),
        duplicate_files=int(hashes.duplicated().sum()),  # same bytes twice, any split
        images_per_class=_per_class_range(manifest.groupby("label").size()),
    )
    return stats


def validate_manifest(manifest: pd.DataFrame, cfg: ValidateConfig, num_classes: int) -> ValidationResult:
    """Run the GX suites over the manifest and its per-class / per-content aggregates."""
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest lacks columns {missing}: build it with build_manifest()")
    tables = {"images": _image_table(manifest), "classes": _class_table(manifest, num_classes),
              "hashes": _hash_table(manifest)}
    context, gx_result = _run_gx(tables, cfg, num_classes)
    rules = _rules_from_gx(gx_result, cfg.max_failed_rows)
    result = ValidationResult(
        success=all(r["success"] for r in rules),
        rules=rules,
        stats=manifest_stats(manifest, cfg),
        gx_result=gx_result,
        gx_context=context,
    )
    if result.success:
        logger.info("validation passed: %d images, all %d rules", len(manifest), len(rules))
    else:
        logger.error("validation failed: rules %s", ", ".join(result.failed_rules))
    return result


# ----------------------------------------------------------------------------- outputs


DATA_DOCS_SITE = "visrec_validate"


def build_data_docs(result: ValidationResult, docs_dir: Path) -> Path:
    """Render the stored GX results as a static HTML site under ``docs_dir``; return index.html."""
    context = result.gx_context
    if context is None:
        raise ValueError("this ValidationResult has no GX context (was it made by validate_manifest?)")
    site_config = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": str(Path(docs_dir).resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    if DATA_DOCS_SITE in context.list_data_docs_sites():
        context.update_data_docs_site(DATA_DOCS_SITE, site_config)
    else:
        context.add_data_docs_site(DATA_DOCS_SITE, site_config)
    # Only our site: the ephemeral context's default site would write to a temp dir.
    context.build_data_docs(site_names=[DATA_DOCS_SITE])
    return docs_dir / "index.html"


def metrics(result: ValidationResult) -> dict[str, int]:
    """Flat numbers for ``dvc metrics``."""
    keys = ("images", "train_images", "test_images", "classes", "train_classes", "test_classes",
            "boxes_clipped")
    out = {k: int(result.stats[k]) for k in keys}
    out["rules_failed"] = len(result.failed_rules)
    out["success"] = int(result.success)
    return out


def write_outputs(result: ValidationResult, manifest: pd.DataFrame, raw_root: str | Path,
                  out_dir: str | Path, cfg: ValidateConfig, data_docs: bool = True) -> dict[str, int]:
    """Write validation.json, gx_result.json, manifest.csv, data_docs/ and report/; return metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "validation.json", jsonable(result.to_dict()))
    write_json(out_dir / "gx_result.json", jsonable(result.gx_result))
    manifest.to_csv(out_dir / "manifest.csv", index=False)
    if data_docs:
        build_data_docs(result, out_dir / "data_docs")
    write_report(manifest, result, resolve_root(raw_root), out_dir, cfg.report_samples)
    return metrics(result)


__all__ = ["RULES", "ValidationResult", "build_data_docs", "jsonable", "manifest_stats", "metrics",
           "validate_manifest", "write_outputs"]
