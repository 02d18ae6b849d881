"""GPU preflight: ``python sweeps/preflight.py [--cpu] [--only ...] [--out ...]`` (``--help`` for all). A thin entry
point: the preflight lives in ``sweeps/bench/`` (``sweeps/bench/preflight.py``), and ``sweeps/launch.py preflight``
forwards to this ``main``. It imports neither Ray nor DuckDB (a bare GPU machine may have neither)."""

from __future__ import annotations

import sys

from sweeps.bench.preflight import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
