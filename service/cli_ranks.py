"""Tables the CLI prints for a version's rank report and a rank sweep's comparison (fleet.sweeps)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

__all__ = ["rank_report_table", "rank_sweep_table"]

_SHOWN_SINGULAR_VALUES = 6  # the leading ones; `--json` has them all


def rank_report_table(report: dict[str, Any]) -> Table:
    """One row per adapted module: r, effective rank at 90 % / 99 % energy, verdict, leading σ(ΔW)."""
    table = Table("module", "r", "eff. rank 90%", "eff. rank 99%", "verdict", "leading singular values",
                  title="Rank report per module (ΔW = s·B·A)")
    for m in report.get("modules", []):
        values = m.get("singular_values", [])
        shown = " ".join(f"{v:.3g}" for v in values[:_SHOWN_SINGULAR_VALUES])
        if len(values) > _SHOWN_SINGULAR_VALUES:
            shown += " …"
        table.add_row(m["module"], str(m["r"]), str(m["effective_rank_90"]), str(m["effective_rank_99"]),
                      m["verdict"].replace("_", " "), shown)
    return table


def rank_sweep_table(sweep: dict[str, Any]) -> Table:
    """The children of the sweep this version won: rank, status, validation loss, steps, rank verdict."""
    chosen = (sweep.get("chosen") or {}).get("job_id")
    table = Table("rank", "job", "status", "val_loss", "steps", "rank report", "",
                  title="Rank sweep (lowest validation loss wins; ties go to the smaller rank)")
    for c in sweep.get("children", []):
        summary = c.get("rank_report") or {}
        loss = c.get("val_loss")
        table.add_row(str(c["rank"]), c["id"], c.get("status") or "-", f"{loss:.4f}" if loss is not None else "-",
                      str(c.get("steps") if c.get("steps") is not None else "-"),
                      str(summary.get("verdict", "-")).replace("_", " "), "chosen" if c["id"] == chosen else "")
    return table
