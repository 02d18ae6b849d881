"""GPU preflight: is this machine's CUDA path correct, how fast is it, and what will a study cost on it?

    python sweeps/preflight.py                    # one GPU (sized for < 8 minutes); report in results/preflight/
    python sweeps/preflight.py --only correct     # a section (correct, fast, cost) or checks (logits, speed, ...)
    python sweeps/preflight.py --cpu              # tiny shapes on the CPU, seconds: the test suite runs this
    python sweeps/launch.py preflight ...         # the same
    CUDA_VISIBLE_DEVICES=1 python sweeps/preflight.py   # another GPU of the machine

From the repository root after ``make install`` (on a machine with the packages but not the project installed:
``PYTHONPATH=. python sweeps/preflight.py``).

Three sections, each a list of checks with a status (pass, fail, info, skipped), the measured figure, the target
where the project has one, and how it was measured:

- correct: our logits (bf16 autocast) against ``transformers`` in fp32 and bf16 on the same weights; which SDPA
  backend our attention runs for unpadded, right-padded and (for contrast) left-padded batches, and why flash was
  refused where it was; a training step's loss under ``torch.compile`` against eager; fused AdamW in use; one
  training step of each LoRA variant and memory saver (DoRA, PiSSA, IA3, QLoRA, checkpointing, 8-bit AdamW).
- fast: training-step tokens/s of ours against ``transformers`` (+ ``peft`` for LoRA) as users run them and against
  ``transformers`` compiled, full and LoRA, at three lengths (``sweeps/bench/step.py``'s code, so the same ratios);
  model FLOPs utilisation of full fine-tuning (PaLM's FLOPs per token over the peak a large matmul reaches here); peak
  memory of LoRA against full fine-tuning on gpt2-medium.
- cost: the overhead of a small LoRA trial (start to first optimizer step; last step to its row in the database) as
  a share of its wall time, and trials per hour with 1, 2, 4 and 8 trials at once on the GPU.

Every check runs on its own: one that raises is a ``fail`` carrying the error, and the report (``preflight.json``,
``preflight.md``) is always written. The JSON's ``rates`` (effective training FLOP/s, setup seconds per trial,
packing gains) are what ``launch.py grid --dry-run`` then costs a study with. Neither Ray nor DuckDB is needed:
packing runs plain processes at once on the GPU (what Ray's fractional GPUs do), and the database write is timed
only where DuckDB is installed. Exit status 0 when no check failed, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import transformers

from sweeps.bench.context import SECTIONS, Check, Context, Shapes, Skipped, _free
from sweeps.bench.context import STATUSES as STATUSES  # re-exported: the statuses a report's checks take
from sweeps.bench.overhead import check_overhead
from sweeps.bench.packing import check_packing
from sweeps.bench.parity import check_compile, check_fused_adamw, check_logits, check_sdpa
from sweeps.bench.peak_memory import check_memory
from sweeps.bench.rates import rates
from sweeps.bench.speed import check_mfu, check_speed, check_trial
from sweeps.bench.variants import check_variants
from sweeps.costs import PREFLIGHT_REPORT

DEFAULT_OUT = PREFLIGHT_REPORT.parent


# check name -> (section, function), in the order they run
CHECKS: dict[str, tuple[str, Callable[[Context], list[Check]]]] = {
    "logits": ("correct", check_logits), "sdpa": ("correct", check_sdpa), "compile": ("correct", check_compile),
    "fused_adamw": ("correct", check_fused_adamw), "variants": ("correct", check_variants),
    "speed": ("fast", check_speed), "trial": ("fast", check_trial),
    "mfu": ("fast", check_mfu),
    "memory": ("fast", check_memory), "overhead": ("cost", check_overhead), "packing": ("cost", check_packing),
}


@dataclass
class Report:
    """The environment, every check, what each check took, and the rates the dry run costs studies with."""

    environment: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    rates: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def to_json(self) -> str:
        return json.dumps({"environment": self.environment, "checks": [asdict(c) for c in self.checks],
                           "seconds": self.seconds, "rates": self.rates}, indent=1)


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, shapes: Shapes) -> dict[str, Any]:
    """What ran where: the device, package versions (those missing named so), bf16 support, cores, the shapes."""
    cuda = device.type == "cuda"
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "mode": "cpu" if shapes.cpu else "gpu",
            "device": torch.cuda.get_device_name(device) if cuda else f"CPU: {_cpu_name()}",
            "device_type": device.type, "cuda": torch.version.cuda if cuda else None,
            "bf16": (torch.cuda.is_bf16_supported() if cuda else
                     f"autocast on CPU (capability {torch.backends.cpu.get_cpu_capability()})"),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            **{name: _version(name) for name in ("torch", "transformers", "peft", "tiktoken", "ray", "duckdb")},
            "shapes": asdict(shapes)}


def _error_check(section: str, name: str, err: BaseException) -> Check:
    where = traceback.extract_tb(err.__traceback__)[-1]
    return Check(section, name, "fail", "error", detail=f"{type(err).__name__}: {str(err).strip()[:1500]} "
                                                         f"({Path(where.filename).name}:{where.lineno})")


def run_checks(ctx: Context, names: list[str], report: Report, echo: Callable[[Check], None]) -> None:
    """Each named check in turn; one that raises becomes a ``fail`` with its error, one that cannot run here a
    ``skipped`` with the reason, and the next runs regardless."""
    for name in names:
        section, check = CHECKS[name]
        started = time.perf_counter()
        try:
            checks = check(ctx)
        except Skipped as why:
            checks = [Check(section, name, "skipped", "not run", detail=str(why))]
        except Exception as err:
            checks = [_error_check(section, name, err)]
        finally:
            _free(ctx.device)
        report.seconds[name] = round(time.perf_counter() - started, 2)
        for c in checks:
            report.checks.append(c)
            echo(c)


MARK = {"pass": "PASS", "fail": "FAIL", "info": "info", "skipped": "skip"}


def check_line(check: Check) -> str:
    """A check as the printed report shows it."""
    target = f" (target {check.target})" if check.target else ""
    return f"  {MARK[check.status]:<5} {check.name}: {check.figure}{target}" + (
        f"\n        {check.detail}" if check.detail else "")


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def to_markdown(report: Report) -> str:
    """The report as Markdown: where and when it ran, one table per section, the stored rates, the time taken."""
    env = report.environment
    lines = [f"# GPU preflight ({env['mode']} mode)", "",
             f"{env['date']} on {env['device']}; torch {env['torch']} (CUDA {env['cuda']}), transformers "
             f"{env['transformers']}, peft {env['peft']}, Ray {env['ray']}, DuckDB {env['duckdb']}; bf16: {env['bf16']}; "
             f"{env['cpu_cores']} CPU cores.", ""]
    if env["mode"] == "cpu":
        lines += ["`--cpu` mode: tiny shapes on a CPU check that every part runs; targets are shown, not judged.", ""]
    for section, title in SECTIONS.items():
        checks = [c for c in report.checks if c.section == section]
        if not checks:
            continue
        lines += [f"## {title}", "", "| check | status | figure | target | how |", "|---|---|---|---|---|"]
        lines += [f"| {_cell(c.name)} | {c.status} | {_cell(c.figure)} | {_cell(c.target)} | {_cell(c.detail)} |"
                  for c in checks]
        lines.append("")
    lines += ["## Rates stored for the dry run", "", "```json", json.dumps(report.rates, indent=1), "```", "",
              "Seconds per check: " + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()) + "."]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def select(only: str | None) -> list[str]:
    """Check names from ``--only``: sections and check names, comma-separated, in run order."""
    if not only:
        return list(CHECKS)
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    unknown = wanted - set(CHECKS) - set(SECTIONS)
    if unknown:
        raise ValueError(f"--only: unknown {', '.join(sorted(unknown))}; sections are {', '.join(SECTIONS)}, "
                         f"checks {', '.join(CHECKS)}")
    return [name for name, (section, _) in CHECKS.items() if name in wanted or section in wanted]


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """``--cpu`` runs on one thread: tiny shapes gain nothing from more, and on a CPU shared with other work a
    multi-threaded kernel stalls at every barrier a descheduled thread holds (steps 50x slower, measured here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preflight.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    parser.add_argument("--only", help=f"comma-separated sections ({', '.join(SECTIONS)}) or checks "
                                       f"({', '.join(CHECKS)})")
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (seconds): checks the script runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        names = select(args.only)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device here; the preflight checks a GPU (--cpu runs it on tiny shapes, a check that the "
              "script works)", file=sys.stderr)
        return 2
    transformers.logging.set_verbosity_error()  # the report, not transformers' load notes and bars
    transformers.logging.disable_progress_bar()
    shapes = Shapes.tiny() if args.cpu else Shapes.gpu()
    device = torch.device("cpu" if args.cpu else "cuda")  # another GPU: CUDA_VISIBLE_DEVICES
    report = Report(environment(device, shapes))
    print(f"preflight on {report.environment['device']} ({report.environment['mode']} mode), "
          f"{report.environment['date']}: {', '.join(names)}", flush=True)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="preflight-") as tmp, _threads(1 if args.cpu else threads):
        ctx = Context(shapes, device, Path(tmp))
        current = [""]

        def echo(check: Check) -> None:
            if check.section != current[0]:
                current[0] = check.section
                print(SECTIONS[check.section], flush=True)
            print(check_line(check), flush=True)

        run_checks(ctx, names, report, echo)
        report.rates = rates(ctx, report.environment)
    write_atomic(args.out / "preflight.json", report.to_json())
    write_atomic(args.out / "preflight.md", to_markdown(report))
    print(f"{len(report.checks)} checks, {len(report.failed)} failed, in {sum(report.seconds.values()):.0f} s; report "
          f"{args.out / 'preflight.json'} and {args.out / 'preflight.md'}", flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
