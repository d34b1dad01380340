"""The data report: what was found, what was skipped or fixed and why, buckets and caption lengths.

Printed and written to `<run_dir>/data_report.json` when training starts, and by `finetune-data`.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from finetune.config.files import atomic_path
from finetune.data.records import ScanResult
from finetune.models.prompts import CaptionTokenizer


def build_report(
    result: ScanResult,
    sizes: Sequence[tuple[int, int]],
    tokenizer: Any = None,
    max_token_length: int | None = None,
    reg_sources: Collection[int] = (),
) -> dict[str, Any]:
    """A JSON-ready summary of a scan; caption lengths in tokens when a tokenizer is given, and how
    many captions are cut at the length the encoders read (`data.max_token_length`); the instance and
    regularisation images apart when `reg_sources` (their `data.sources` numbers) has any."""
    captions = [record.caption or "" for record in result.records]
    buckets = Counter(f"{width}x{height}" for width, height in sizes)
    report: dict[str, Any] = {
        "images": len(result.records),
        "samples_per_epoch": round(sum(record.repeats for record in result.records), 2),
        "skipped": len(result.skipped),
        "fixed": len(result.fixed),
        "uncaptioned": result.uncaptioned,
        "buckets": dict(sorted(buckets.items(), key=lambda item: -item[1])),
        "caption_words": _stats([len(caption.split()) for caption in captions]),
    }
    if tokenizer is not None and captions:
        # Tokens with the start and end markers; longer captions are cut at the limit.
        lengths = [len(ids) for ids in tokenizer(captions, add_special_tokens=True).input_ids]
        limit = CaptionTokenizer(tokenizer, max_token_length=max_token_length).token_limit
        report["caption_tokens"] = _stats(lengths)
        report["captions_truncated"] = sum(length > limit for length in lengths)
        report["token_limit"] = limit
    if reg_sources:
        report["instance_and_regularisation"] = {
            kind: {
                "images": len(records),
                "samples_per_epoch": round(sum(record.repeats for record in records), 2),
            }
            for kind, records in (
                ("instance", [r for r in result.records if r.source not in reg_sources]),
                ("regularisation", [r for r in result.records if r.source in reg_sources]),
            )
        }
    report["notes"] = list(result.notes)
    report["skipped_files"] = [{"file": s.key, "reason": s.reason} for s in result.skipped]
    report["fixed_files"] = [{"file": f.key, "fix": f.what} for f in result.fixed]
    # How they were captioned (or skipped) instead is in the notes (or skipped_files): data.missing_caption.
    report["uncaptioned_files"] = list(result.uncaptioned_keys)
    return report


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": min(values), "mean": round(statistics.fmean(values), 1), "max": max(values)}


def format_report(report: dict[str, Any], max_files: int | None = None) -> str:
    """The report as lines for a terminal or a log; `max_files` caps the per-file lists."""
    words = report["caption_words"]
    lines = [
        f"images: {report['images']} usable, {report['skipped']} skipped, {report['fixed']} fixed, "
        f"{report['uncaptioned']} without a caption; {report['samples_per_epoch']:g} samples per epoch",
        f"captions: {words['min']}-{words['max']} words (mean {words['mean']})",
    ]
    if "instance_and_regularisation" in report:
        lines.append(
            "; ".join(
                f"{kind} images: {counts['images']} ({counts['samples_per_epoch']:g} samples per epoch)"
                for kind, counts in report["instance_and_regularisation"].items()
            )
        )
    if "caption_tokens" in report:
        tokens = report["caption_tokens"]
        lines.append(
            f"          {tokens['min']}-{tokens['max']} tokens (mean {tokens['mean']}); "
            f"{report['captions_truncated']} longer than the limit of {report['token_limit']} are cut"
        )
    lines.append("buckets (width x height: images):")
    histogram = report["buckets"]
    widest = max(histogram.values(), default=1)
    for size, count in histogram.items():
        lines.append(f"  {size:>11}  {count:>6}  {'#' * max(1, round(30 * count / widest))}")
    lines += [f"note: {note}" for note in report["notes"]]
    for title, entries in (
        ("skipped", [f"{entry['file']}: {entry['reason']}" for entry in report["skipped_files"]]),
        ("fixed", [f"{entry['file']}: {entry['fix']}" for entry in report["fixed_files"]]),
        ("without a caption (data.missing_caption)", report["uncaptioned_files"]),
    ):
        if not entries:
            continue
        lines.append(f"{title}:")
        shown = entries if max_files is None else entries[:max_files]
        lines += [f"  {entry}" for entry in shown]
        if len(shown) < len(entries):
            lines.append(f"  ... and {len(entries) - len(shown)} more (all in data_report.json)")
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: Path) -> Path:
    """Write the report as JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return path
