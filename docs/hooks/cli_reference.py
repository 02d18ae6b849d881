"""MkDocs hook: docs/cli.md's reference is generated from the real argparse parsers at build time.

Each command's ``--help`` is what its own ``main()`` prints for ``--help``, run in this process (no copy kept by
hand): the parsers are built by the code users run. ``sweeps/launch.py``'s subcommands are read off
``sweeps.launch.build_parser()``, so a new subcommand appears here without editing this file. A command whose
``--help`` fails, or a cli.md without the marker, fails the build.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parents[2]
PAGE = "cli.md"
MARKER = "<!-- cli-reference -->"
WIDTH = "110"  # help is wrapped to this many columns, whatever terminal runs the build

# (the script a user runs, the module whose main() it calls); sweeps/launch.py comes first, one entry per subcommand
SCRIPTS = [
    ("sweeps/train.py", "sweeps.train"),
    ("analysis/build_guide.py", "analysis.build_guide"),
    ("analysis/judge.py", "analysis.judge"),
    ("analysis/calibration.py", "analysis.calibration"),
    ("sweeps/preflight.py", "sweeps.preflight"),
    ("sweeps/bench/step.py", "sweeps.bench.step"),
    ("sweeps/bench/trial.py", "sweeps.bench.trial"),
    ("sweeps/bench/dpo.py", "sweeps.bench.dpo"),
    ("sweeps/bench/variants.py", "sweeps.bench.variants"),
    ("sweeps/bench/adapters.py", "sweeps.bench.adapters"),
]
LAUNCH = ("sweeps/launch.py", "sweeps.launch")
FORWARDED = {"preflight": "sweeps/preflight.py"}  # launch.py subcommands that hand their arguments to another script


def _help(script: str, module: str, argv: list[str]) -> str:
    """What ``python SCRIPT *argv --help`` prints, with the usage line naming the command as a user types it."""
    saved_argv0, saved_columns = sys.argv[0], os.environ.get("COLUMNS")
    sys.argv[0], os.environ["COLUMNS"] = str(ROOT / script), WIDTH  # argparse's prog and width
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                code = importlib.import_module(module).main([*argv, "--help"])
            except SystemExit as stop:
                code = stop.code
    finally:
        sys.argv[0] = saved_argv0
        if saved_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved_columns
    text = out.getvalue()
    if code not in (0, None) or "usage:" not in text:
        raise PluginError(f"docs: `python {script} {' '.join(argv)} --help` exited {code}: {err.getvalue()[-500:]}")
    return _name_usage(text, Path(script).name, f"python {script}")


def _name_usage(text: str, prog: str, command: str) -> str:
    """argparse names the program by its file name; the reference names it by the command typed at the root."""
    lines = text.rstrip().splitlines()
    if not lines[0].startswith(f"usage: {prog}"):
        return text.rstrip()
    shift = len(command) - len(prog)
    lines[0] = lines[0].replace(f"usage: {prog}", f"usage: {command}", 1)
    for i in range(1, len(lines)):  # the usage's continuation lines, aligned under its first argument
        if not lines[i].strip():
            break
        lines[i] = " " * shift + lines[i]
    return "\n".join(lines)


def _summary(help_text: str) -> str:
    """The description's first paragraph (what follows the usage block), on one line."""
    paragraphs = [p for p in help_text.split("\n\n") if p.strip()]
    if len(paragraphs) < 2 or paragraphs[1].lstrip().startswith(("options:", "positional arguments:")):
        return ""
    return " ".join(paragraphs[1].split()).replace("|", "\\|")


def _launch_subcommands() -> list[tuple[str, str]]:
    import argparse

    from sweeps.launch import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return [(choice.dest, choice.help or "") for choice in action._choices_actions]
    raise PluginError("docs: sweeps.launch.build_parser() has no subcommands")


def _anchor(command: str) -> str:
    return command.removeprefix("python ").replace("/", "").replace(".py", "py").replace(" ", "-")


def reference() -> str:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    script, module = LAUNCH
    entries: list[tuple[str, str, str]] = []  # (command, one line, help text)
    for name, line in _launch_subcommands():
        command = f"python {script} {name}"
        if name in FORWARDED:
            target = FORWARDED[name]
            entries.append((command, f"{line}: forwards every argument to `python {target}`, below", ""))
            continue
        entries.append((command, line, _help(script, module, [name])))
    for script, module in SCRIPTS:
        text = _help(script, module, [])
        entries.append((f"python {script}", _summary(text), text))

    out = ["| command | what it does |", "|---|---|"]
    out += [f"| [`{command}`](#{_anchor(command)}) | {line} |" for command, line, _ in entries]
    for command, line, text in entries:
        out += ["", f"## `{command}` {{#{_anchor(command)}}}", ""]
        out += [f"{line}.", ""] if not text else ["```text", text, "```"]
    return "\n".join(out) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:  # mkdocs passes page, config, files
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"docs: {PAGE} lost its marker {MARKER!r}; the generated reference goes there")
    return markdown.replace(MARKER, reference())


if __name__ == "__main__":  # python docs/hooks/cli_reference.py: the generated reference on stdout
    print(reference())
