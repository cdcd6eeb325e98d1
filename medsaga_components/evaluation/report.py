"""Evaluation reports: the full results as JSON and a Markdown table for people.

The table has one row per volume and class (Dice, HD95 in mm, status), then the per-class
means over volumes and the overall mean. Undefined HD95 values are printed with the reason
(e.g. ``n/a (empty_prediction)``), never as a bare blank or NaN.
"""

from __future__ import annotations

from pathlib import Path

from medsaga_components.io.atomic import write_json_atomic, write_text_atomic


def _number(value: float | None, reason: str = "") -> str:
    if value is None:
        return f"n/a ({reason})" if reason else "n/a"
    return f"{value:.4f}"


def markdown_table(summary: dict) -> str:
    """A ``summarize``/``evaluate_segmentation`` result -> Markdown text."""
    lines = [
        "| Volume | Class | Dice | HD95 (mm) | Status |",
        "|---|---|---:|---:|---|",
    ]
    for volume in summary["volumes"]:
        for c in volume["classes"]:
            lines.append(f"| {volume['volume']} | {c['name']} | {_number(c['dice'])} | "
                         f"{_number(c['hd95_mm'], c['status'])} | {c['status']} |")
    for c in summary["per_class"]:
        undefined = c["volumes"] - c["volumes_with_hd95"]
        note = f"{undefined} of {c['volumes']} volumes without HD95" if undefined else "all volumes"
        lines.append(f"| **mean** | {c['name']} | {_number(c['mean_dice'])} | "
                     f"{_number(c['mean_hd95_mm'], 'no volume with HD95')} | {note} |")
    lines.append(f"| **mean** | **all classes** | **{_number(summary['mean_dice'])}** | "
                 f"**{_number(summary['mean_hd95_mm'], 'no volume with HD95')}** | |")
    lines.append(f"| **mean** | **classes present in the ground truth** | "
                 f"**{_number(summary['mean_dice_present'], 'no class present')}** | | |")
    return "\n".join(lines) + "\n\n" + summary.get("conventions", "") + "\n"


def write_report(summary: dict, out_dir: str | Path, name: str = "evaluation", title: str | None = None) -> dict:
    """Write ``<name>.json`` and ``<name>.md`` into ``out_dir`` (atomically); returns their paths."""
    out_dir = Path(out_dir)
    json_path = write_json_atomic(out_dir / f"{name}.json", summary)
    heading = f"# {title}\n\n" if title else ""
    md_path = write_text_atomic(out_dir / f"{name}.md", heading + markdown_table(summary))
    return {"json": str(json_path), "markdown": str(md_path)}
