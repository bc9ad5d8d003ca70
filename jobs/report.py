"""The report of a Tune search: the trial table (CSV, JSON, Markdown), the Pareto plot, the text summary.

Pure files and matplotlib; the MLflow side is `jobs.tracking.search.SearchRun.log_report`.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from jobs.tracking import schedule_tag

TABLE_FIELDS = ("trial_id", "schedule", "stages", "tpm", "trm", "lr", "seed", "gflops", "gflops_predicted", "mpjpe_mm",
                "p_mpjpe_mm", "epochs", "complete", "pareto", "status")


def write_search_report(rows: list[dict[str, Any]], summary: dict[str, Any], out_dir: Path, title: str,
                        hot_schedule: list[list[int]]) -> list[Path]:
    """OUT/pareto.{csv,json,md,png} and summary.json; -> the files the parent run keeps (csv, json, png)."""
    import matplotlib.pyplot as plt

    with open(out_dir / "pareto.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "schedule": json.dumps(r["schedule"])})
    (out_dir / "pareto.json").write_text(json.dumps({"trials": rows, "summary": summary}, indent=1))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "pareto.md").write_text(table_markdown(rows))
    fig = pareto_figure(rows, hot_schedule, title)
    fig.savefig(out_dir / "pareto.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [out_dir / "pareto.csv", out_dir / "pareto.json", out_dir / "pareto.png"]


def pareto_figure(rows: list[dict[str, Any]], hot_schedule: list[list[int]], title: str) -> Any:
    """GFLOPs (x) vs MPJPE (y): every trial, the Pareto front, the full model and the HoT point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jobs.tune_search import find_schedule

    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [r for r in rows if r["complete"] and math.isfinite(r["mpjpe_mm"])]
    stopped = [r for r in rows if not r["complete"] and math.isfinite(r["mpjpe_mm"])]
    ax.scatter([r["gflops"] for r in done], [r["mpjpe_mm"] for r in done], c="tab:gray", s=22,
               label="trial (all epochs)")
    if stopped:
        ax.scatter([r["gflops"] for r in stopped], [r["mpjpe_mm"] for r in stopped], marker="x", c="silver", s=18,
                   label="stopped early (ASHA)")
    front = sorted((r for r in done if r["pareto"]), key=lambda r: r["gflops"])
    ax.plot([r["gflops"] for r in front], [r["mpjpe_mm"] for r in front], "-o", c="tab:red", ms=5,
            label="Pareto front")
    for r in front:
        ax.annotate(schedule_tag(r["schedule"]), (r["gflops"], r["mpjpe_mm"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    for schedule, marker, color, label in (([], "s", "black", "full model"),
                                           (hot_schedule, "*", "tab:blue", "HoT (1 stage)")):
        r = find_schedule(rows, schedule) if (schedule or label == "full model") else None
        if r is not None:
            ax.scatter([r["gflops"]], [r["mpjpe_mm"]], marker=marker, s=140, facecolors="none", edgecolors=color,
                       linewidths=1.8, label=f"{label}: {schedule_tag(r['schedule'])}"
                       + ("" if r["complete"] else " (stopped early)"), zorder=5)
    ax.set_xlabel("GFLOPs per clip (Linear layers, 2 x MACs)")
    ax.set_ylabel("MPJPE (mm, best epoch)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """The trial table as Markdown (OUT/pareto.md; docs), cheapest first; Pareto rows in bold."""
    lines = ["| trial | schedule | TPM | TRM | lr | seed | GFLOPs | MPJPE mm | P-MPJPE mm | epochs | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["gflops"], r["mpjpe_mm"])):
        cells = [r["trial_id"], f"`{schedule_tag(r['schedule'])}`", r["tpm"], r["trm"], f"{r['lr']:g}", str(r["seed"]),
                 f"{r['gflops']:.4f}", f"{r['mpjpe_mm']:.1f}", f"{r['p_mpjpe_mm']:.1f}", str(r["epochs"]),
                 r["status"] + (", **Pareto**" if r["pareto"] else "")]
        if r["pareto"]:
            cells[7] = f"**{cells[7]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def trial_line(r: dict[str, Any]) -> str:
    """One trial in a line: id, schedule, strategies, lr, GFLOPs, MPJPE, epochs."""
    return (f"{r['trial_id']}  {schedule_tag(r['schedule']):<16} {r['tpm']:<9} {r['trm']:<15} lr {r['lr']:<8g}"
            f" {r['gflops']:.4f} GFLOPs  {r['mpjpe_mm']:.2f} mm  ({r['epochs']} epochs)")


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as text: the Pareto front, the named points, HoT's challengers, the seed groups."""
    out = [f"{summary['trials']} trials, {summary['complete']} ran every epoch; Pareto front (GFLOPs up, MPJPE down):"]
    out += ["  " + trial_line(r) for r in summary["pareto_rows"]]
    rows = summary["rows"]
    for key, text in (("best", "best MPJPE"), ("cheapest_within_1pct", "cheapest within 1 % of the best"),
                      ("full", "full model"), ("hot", "HoT one stage")):
        if key in rows:
            out.append(f"{text}: {trial_line(rows[key])}")
    if "hot" in rows:
        out.append("hierarchical schedules beating HoT at <= its FLOPs: "
                   + (", ".join(trial_line(r) for r in summary["beats_hot_rows"]) or "none"))
    for g in summary.get("seed_groups", []):
        out.append(f"seeds {g['seeds']}: {schedule_tag(g['schedule']):<16} {g['tpm']:<9} {g['trm']:<15} "
                   f"{g['gflops']:.4f} GFLOPs  {g['mpjpe_mm_mean']:.2f} +- {g['mpjpe_mm_std']:.2f} mm")
    return "\n".join(out)
