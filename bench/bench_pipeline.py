"""End-to-end benchmark of the production shape: the ``pipeline`` job, ``dispatch`` and ``load``.

``python -m bench bench_pipeline`` (or ``python -m bench.bench_pipeline [--rate R] [--burst N] …``
against the stack in the environment / ``.clickpulse/stack.env``): :mod:`bench.bench_e2e` with
``--pipeline`` and, by default, 1,000 raw events/s in the latency phase (issue 13's rate). Same phases and
rows as ``bench_e2e``; every option of it applies.
"""

from __future__ import annotations

import sys

from bench import bench_e2e


def main(argv: list[str] | None = None) -> int:
    """Run :func:`bench.bench_e2e.main` with ``--pipeline``; later options win over the default rate."""
    return bench_e2e.main(["--pipeline", "--rate", "1000", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
