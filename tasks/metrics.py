"""Classification metrics from predictions and labels (accuracy, macro-F1, per-class F1), computed with torch."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def classification_metrics(preds: torch.Tensor, labels: torch.Tensor, label_names: Sequence[str]) -> dict[str, float]:
    """``accuracy``, ``macro_f1`` and ``f1_<label>`` for each class. A class never predicted nor present scores 0
    F1 but still counts in the macro average (the usual, conservative convention)."""
    k = len(label_names)
    confusion = torch.bincount(labels * k + preds, minlength=k * k).view(k, k).double()  # rows: truth, cols: pred
    tp = confusion.diag()
    precision = tp / confusion.sum(0).clamp_min(1)
    recall = tp / confusion.sum(1).clamp_min(1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    out = {"accuracy": float(tp.sum() / confusion.sum()), "macro_f1": float(f1.mean())}
    out.update({f"f1_{name}": float(f1[i]) for i, name in enumerate(label_names)})
    return out
