"""Make the docs' example plug-in importable as if pip-installed: a site folder holding its
module and a dist-info with the entry point (what `pip install docs/examples/plugin` writes)."""

from __future__ import annotations

import shutil
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "plugin"


def install_example_plugin(site: Path, entry: str = "geomedian = fbm_geomedian:GeometricMedian") -> Path:
    site.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLE / "fbm_geomedian.py", site / "fbm_geomedian.py")
    info = site / "fbm_geomedian-0.1.0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fbm-geomedian\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[fedbiomq.aggregators]\n{entry}\n")
    return site
