"""Shared output for the benchmark scripts: a small aligned table on stdout plus a JSON file."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import jax


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "jax_backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def report(name: str, rows: list[dict[str, Any]], out: str | None, **extra: Any) -> None:
    """Print `rows` as a table and write them with the machine description to `out` (JSON) if given."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{name}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    for key, value in extra.items():
        print(f"{key}: {_fmt(value)}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({"benchmark": name, "machine": machine(), "rows": rows, **extra},
                                        indent=2) + "\n")
        print(f"wrote {out}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
