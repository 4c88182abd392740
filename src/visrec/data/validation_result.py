"""The outcome of the validate stage's suite: per-rule results, counts, and the raw GX results.

Its own module so that the report (:mod:`visrec.data.report`) reads it without importing the
suite that produces it (:mod:`visrec.data.validation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ValidationResult:
    success: bool
    # {rule, description, success, unexpected_count, examples[, observed, missing, error]}
    rules: list[dict[str, Any]]
    stats: dict[str, Any]
    gx_result: dict[str, Any]  # raw GX results (JSON), keyed by table: images, classes, hashes
    # The GX context that ran the suites: it holds the results data docs are built from.
    gx_context: Any = field(default=None, repr=False, compare=False)

    @property
    def failed_rules(self) -> list[str]:
        return [r["rule"] for r in self.rules if not r["success"]]

    def to_dict(self) -> dict[str, Any]:
        return {"success": self.success, "rules": self.rules, "stats": self.stats}

    def summary(self) -> str:
        """Multi-line text: counts, then one line per failed rule with its offending rows."""
        s = self.stats
        lines = [
            f"validation {'PASSED' if self.success else 'FAILED'}: {s['images']} images "
            f"(train {s['train_images']} in {s['train_classes']} classes, "
            f"test {s['test_images']} in {s['test_classes']} classes), "
            f"{s['boxes_clipped']} boxes clipped, {s['greyscale_images']} greyscale"
        ]
        for r in self.rules:
            if r["success"]:
                continue
            detail = f"{r['unexpected_count']} offending" if r["unexpected_count"] else "failed"
            lines.append(f"  rule {r['rule']} FAILED ({r['description']}): {detail}")
            if r.get("error"):
                lines.append(f"    error: {r['error']}")
            if r.get("observed") is not None:
                lines.append(f"    observed: {r['observed']}")
            if r.get("missing"):
                lines.append(f"    missing: {', '.join(map(str, r['missing']))}")
            for example in r["examples"]:
                lines.append("    " + ", ".join(f"{k}={v}" for k, v in example.items()))
            if r["unexpected_count"] > len(r["examples"]):
                lines.append(f"    ... and {r['unexpected_count'] - len(r['examples'])} more")
        return "\n".join(lines)
