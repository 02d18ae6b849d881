"""Direct Preference Optimization: the loss, its implicit rewards, and the options that shape it.

For a pair with summed response log-probabilities ``pc, pr`` under the policy and ``rc, rr`` under the reference,
``h = (pc - pr) - (rc - rr)``:
- ``sigmoid`` (Rafailov et al., 2023): ``-(1 - eps) log σ(β h) - eps log σ(-β h)`` (``eps`` = label smoothing,
  the conservative DPO of a noisy-label model);
- ``ipo`` (Azar et al., 2023): ``(h - 1 / (2β))²``.
Implicit rewards are ``β (pc - rc)`` and ``β (pr - rr)``. When policy = reference, h = 0: the sigmoid loss is log 2
and every reward is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import Problems, is_number

DPO_LOSSES = ("sigmoid", "ipo")


@dataclass
class DPOConfig:
    """DPO options (used by the ``preference`` task only)."""

    beta: float = 0.1
    """Strength of the pull towards the reference (larger: stay closer)."""
    loss: str = "sigmoid"
    """``sigmoid`` (DPO) or ``ipo``."""
    label_smoothing: float = 0.0
    """Assumed share of flipped preference labels (sigmoid loss only), in [0, 0.5)."""
    init: str = "base"
    """Starting point of the policy, which is also the reference: ``base`` (the model as ``model.*`` configures it)
    or a local Hugging Face checkpoint directory (e.g. an Alpaca trial exported with ``sweeps/train.py --out``)."""

    def __post_init__(self) -> None:
        problems = Problems()
        if not is_number(self.beta) or not self.beta > 0:
            problems.add("beta", f"must be a number > 0, got {self.beta!r}")
        if self.loss not in DPO_LOSSES:
            problems.add("loss", f"unknown DPO loss {self.loss!r}; choose one of {', '.join(DPO_LOSSES)}")
        if not is_number(self.label_smoothing) or not 0 <= self.label_smoothing < 0.5:
            problems.add("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing!r}")
        elif self.label_smoothing and self.loss != "sigmoid":
            problems.add("label_smoothing", "only the sigmoid loss takes label smoothing")
        if not isinstance(self.init, str) or not self.init:
            problems.add("init", f"must be 'base' or a checkpoint directory, got {self.init!r}")
        problems.raise_if_any("invalid DPO configuration")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, config: DPOConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss, chosen reward and rejected reward, each ``(B,)``, from summed response log-probs ``(B,)``."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if config.loss == "ipo":
        loss = (h - 1 / (2 * config.beta)) ** 2
    else:
        eps = config.label_smoothing
        loss = -(1 - eps) * F.logsigmoid(config.beta * h) - eps * F.logsigmoid(-config.beta * h)
    return loss, config.beta * (policy_chosen - ref_chosen).detach(), config.beta * (policy_rejected - ref_rejected).detach()
