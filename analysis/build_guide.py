"""Build the practical guide from the study database: ``python analysis/build_guide.py [--db PATH] [--out DIR]``.

Opens the DuckDB file read-only, runs the queries in ``analysis/queries.py``, draws the figures and renders the
Jinja2 templates in ``report_templates/`` into ``DIR/guide.md``, ``DIR/guide.html`` and ``DIR/figures/*.png``.
Everything is written into a temporary folder first and moved into place at the end, so a failure leaves the previous
guide as it was. A missing or locked database, an unknown sweep, or no completed trial: a message and exit code 2.
A reported sweep that did not finish (interrupted, or a killed driver's) is refused the same way, naming how many
trials it is missing, unless ``--allow-partial``: the guide then opens with a banner that says so.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import jinja2

from analysis import figures, queries
from analysis.db import DEFAULT_DB, DatabaseError, connect
from analysis.guide import Guide, collect, task_title
from analysis.stats import MARGINS

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "report_templates"
DEFAULT_OUT = "reports"


class OutputError(RuntimeError):
    """``--out`` cannot hold the guide (an existing file, or a folder that cannot be written)."""


class PartialSweepError(RuntimeError):
    """A reported sweep did not finish, and ``--allow-partial`` was not given."""


# Where Markdown (CommonMark) starts raw HTML or an autolink: ``<`` before a letter, ``/``, ``!`` or ``?``. A ``<`` before
# anything else (``p < 0.001``) is shown as it is, and stays readable in the .md file.
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")


def md_text(value: object) -> str:
    """Text for Markdown, which passes raw HTML through: every ``<`` that could open a tag, comment or autolink becomes
    ``&lt;``, so a name from the database (``<script>``) stays text. Idempotent (the reference has no ``<``): every
    ``{{ }}`` of the Markdown templates passes through it, macro output (already escaped) included."""
    return _TAG_START.sub("&lt;", str(value))


def md_cell(value: object) -> str:
    """A Markdown table cell: pipes and HTML brackets escaped (text from the database stays text), newlines as
    spaces."""
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def environment(autoescape: bool) -> jinja2.Environment:
    """HTML autoescapes; Markdown passes every expression through ``md_text`` (Markdown renders raw HTML too)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=autoescape,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             finalize=None if autoescape else md_text)
    env.filters["md_cell"] = md_cell
    env.filters["task_title"] = task_title
    return env


def render(guide: Guide) -> tuple[str, str]:
    """(Markdown, HTML) of the guide."""
    md = environment(autoescape=False).get_template("guide.md.j2").render(g=guide)
    html = environment(autoescape=True).get_template("guide.html.j2").render(g=guide)
    return md, html


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that cannot hold the guide before the database is read or anything written: an existing
    file (the guide would replace nothing but fail late), or a folder under a file or one that cannot be written."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: an existing file, not a folder; pass a folder for guide.md, guide.html and "
                          "figures/")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"--out {out}: {existing} is a file, so the folder cannot be made; pass another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out}: {existing} is not writable; pass a folder you can write to")


def build(db: str | Path, out: str | Path, sweeps: Sequence[str] | None = None,
          margins: Mapping[str, float] | None = None, allow_partial: bool = False) -> Path:
    """Write the guide into ``out``; returns the path of guide.html. An unfinished sweep among those reported is
    refused (PartialSweepError) unless ``allow_partial``; the guide then carries a banner."""
    out = Path(out)
    check_out(out)
    con = connect(db, read_only=True)
    try:
        guide = collect(con, sweeps, margins)
    finally:
        con.close()
    if guide.unfinished and not allow_partial:
        raise PartialSweepError(f"{db}: " + "; ".join(guide.unfinished) + ". Resume it, or pass --allow-partial for a "
                                "guide of what finished (with a banner saying so)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".guide-", dir=out))
    except OSError as err:  # e.g. a read-only filesystem, which os.access does not see for root
        raise OutputError(f"--out {out}: cannot write there ({err.strerror or err}); pass a folder you can write "
                          "to") from None
    try:
        (staging / "figures").mkdir()
        figures.render(guide.figures, staging)
        md, html = render(guide)
        (staging / "guide.md").write_text(md, encoding="utf-8")
        (staging / "guide.html").write_text(html, encoding="utf-8")
        old = out / "figures"
        if old.exists():
            shutil.rmtree(old)
        os.replace(staging / "figures", old)
        for name in ("guide.md", "guide.html"):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "guide.html"


def parse_margins(items: Sequence[str] | None) -> dict[str, float]:
    """``--margin accuracy=0.02 --margin perplexity=0.05`` as a dict; raises ValueError naming a bad item."""
    margins = {}
    for item in items or ():
        metric, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not metric or not math.isfinite(number) or number <= 0:
            raise ValueError(f"--margin {item!r}: expected METRIC=VALUE with a positive number, e.g. accuracy=0.01 "
                             f"(absolute) or perplexity=0.02 (relative)")
        margins[metric] = number
    return margins


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default=DEFAULT_DB, help=f"the study database (default {DEFAULT_DB})")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"folder for guide.md, guide.html, figures/ "
                                                           f"(default {DEFAULT_OUT})")
    parser.add_argument("--sweep", action="append", metavar="ID",
                        help="a sweep to report (repeatable); default: every sweep of the latest sweep's study")
    parser.add_argument("--margin", action="append", metavar="METRIC=VALUE",
                        help="practical margin within which two groups count as equivalent (repeatable): absolute "
                             "for proportions (win_rate too), in points for judge_score (0-100), relative for "
                             "perplexity; defaults: "
                             f"{', '.join(f'{k}={v:g}' for k, v in sorted(MARGINS.items()))}")
    parser.add_argument("--allow-partial", action="store_true",
                        help="render even when a reported sweep did not finish (interrupted or killed): the guide "
                             "opens with a banner naming how many trials are missing (default: refuse, exit code 2)")
    parser.add_argument("--print-sql", action="store_true", help="print the SQL views the guide reads, and exit")
    args = parser.parse_args(argv)
    try:
        margins = parse_margins(args.margin)
    except ValueError as err:
        print(f"build_guide: {err}", file=sys.stderr)
        return 2
    if args.print_sql:
        print("-- after: CREATE TEMP TABLE guide_sweeps (id VARCHAR); INSERT the sweep ids")
        print(queries.VIEWS)
        return 0
    try:
        html = build(args.db, args.out, args.sweep, margins, args.allow_partial)
    except (DatabaseError, OutputError, PartialSweepError) as err:
        print(f"build_guide: {err}", file=sys.stderr)
        return 2
    print(f"markdown: {html.with_name('guide.md').resolve()}")
    print(f"guide: {html.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
