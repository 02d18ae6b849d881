"""Benchmarks and the GPU preflight.

- ``step.py``: our training step against ``transformers`` (+ ``peft``) (``python sweeps/bench/step.py``);
- ``trial.py``: a whole trial against Hugging Face ``Trainer`` (``python sweeps/bench/trial.py``, or
  ``step.py --level trial``);
- ``dpo.py``: the DPO reference model, a frozen copy against precomputed log-probs (``python sweeps/bench/dpo.py``);
- ``timing.py``: what they share: device synchronisation, alternating timed rounds, the trials' precision;
- the preflight (``python sweeps/preflight.py``, or ``python sweeps/launch.py preflight``): ``preflight.py`` (the
  report and its command line) runs the checks of ``parity.py`` (correct on this device), ``speed.py`` and
  ``peak_memory.py`` (fast on this device), ``overhead.py`` and ``packing.py`` (a study's cost on this machine),
  which share ``context.py``; ``rates.py`` is what the report stores for the dry run.

Nothing here needs Ray; DuckDB only to time the database write, where it is installed.
"""
