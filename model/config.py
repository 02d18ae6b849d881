"""What every config dataclass of the project shares (problems collected per key and raised once), and GPT-2's own
configuration: the four released sizes and ``GPT2Config``, which ``config.json`` maps onto one to one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


class ConfigError(ValueError):
    """A configuration with problems; ``problems`` holds ``(key, message)`` pairs and the message lists them all."""

    def __init__(self, problems: Sequence[tuple[str, str]], title: str = "invalid configuration") -> None:
        self.problems = list(problems)
        self.title = title
        super().__init__(title + ":\n" + "\n".join(f"  - {key}: {msg}" for key, msg in self.problems))

    def keys(self) -> list[str]:
        return [key for key, _ in self.problems]

    def prefixed(self, prefix: str) -> ConfigError:
        """The same problems under a section name: ``rank`` becomes ``lora.rank``."""
        return ConfigError([(f"{prefix}.{key}", msg) for key, msg in self.problems], self.title)


class Problems:
    """Collects ``(key, message)`` problems in ``__post_init__`` and raises them together."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, key: str, message: str) -> None:
        self.items.append((key, message))

    def extend(self, err: ConfigError, prefix: str | None = None) -> None:
        self.items.extend((err.prefixed(prefix) if prefix else err).problems)

    def raise_if_any(self, title: str) -> None:
        if self.items:
            raise ConfigError(self.items, title)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, int]] = {
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768},  # 124M
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024},  # 355M
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280},  # 774M
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600},  # 1558M
}

# Activation names Hugging Face uses for GPT-2's tanh-approximated GELU; anything else is a different model.
_TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def preset_name(name: str) -> str | None:
    """Map ``gpt2-medium`` or ``openai-community/gpt2-medium`` to the preset key; None when it is no preset."""
    short = name.removeprefix("openai-community/")
    return short if short in PRESETS else None


@dataclass
class GPT2Config:
    """Architecture and dropout of a GPT-2. Field names are Hugging Face's, so ``config.json`` maps one to one."""

    vocab_size: int = 50257
    """Rows of the token embedding (and columns of the tied LM head)."""
    n_positions: int = 1024
    """Longest sequence the learned position embedding covers."""
    n_embd: int = 768
    """Width of the residual stream."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide ``n_embd``."""
    n_inner: int | None = None
    """Hidden width of the MLP; None means ``4 * n_embd`` as in every released GPT-2."""
    embd_pdrop: float = 0.0
    """Dropout after token + position embedding. Released checkpoints were pretrained with 0.1; 0.0 is the usual
    fine-tuning choice, and the trial config decides."""
    attn_pdrop: float = 0.0
    """Dropout on attention probabilities."""
    resid_pdrop: float = 0.0
    """Dropout on each block's attention and MLP outputs before they join the residual stream."""
    layer_norm_epsilon: float = 1e-5
    """LayerNorm epsilon (GPT-2 uses 1e-5)."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """Fields of a loaded ``config.json`` this model does not use (``bos_token_id``, ``task_specific_params``...),
    kept so ``save_pretrained`` writes them back."""

    def __post_init__(self) -> None:
        problems = Problems()
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                problems.add(name, f"must be a positive integer, got {value!r}")
        if self.n_inner is not None and (not is_int(self.n_inner) or self.n_inner < 1):
            problems.add("n_inner", f"must be a positive integer or None, got {self.n_inner!r}")
        if is_int(self.n_embd) and is_int(self.n_head) and self.n_head > 0 and self.n_embd % self.n_head:
            problems.add("n_head", f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
            value = getattr(self, name)
            if not is_number(value) or not 0.0 <= value < 1.0:
                problems.add(name, f"must be in [0, 1), got {value!r}")
        if not is_number(self.layer_norm_epsilon) or not self.layer_norm_epsilon > 0:
            problems.add("layer_norm_epsilon", f"must be > 0, got {self.layer_norm_epsilon!r}")
        problems.raise_if_any("invalid GPT2Config")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPT2Config:
        """One of the four released sizes (``gpt2`` ... ``gpt2-xl``, ``openai-community/`` names too)."""
        key = preset_name(name)
        if key is None:
            raise ConfigError([("model", f"unknown GPT-2 preset {name!r}; choose one of {', '.join(PRESETS)}")])
        return cls(**{**PRESETS[key], **overrides})

    def with_dropout(self, p: float) -> GPT2Config:
        """The same architecture with all three dropouts set to ``p``."""
        return replace(self, embd_pdrop=p, attn_pdrop=p, resid_pdrop=p)

    # Hugging Face config.json ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "config.json") -> GPT2Config:
        """Read a Hugging Face GPT-2 ``config.json``; settings this implementation does not compute are refused."""
        problems = Problems()
        model_type = data.get("model_type", "gpt2")
        if model_type != "gpt2":
            problems.add("model_type", f"is {model_type!r}, expected 'gpt2'")
        activation = data.get("activation_function", "gelu_new")
        if activation not in _TANH_GELU_NAMES:
            problems.add("activation_function", f"{activation!r} is not GPT-2's tanh GELU ({_TANH_GELU_NAMES})")
        for flag, expected in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("reorder_and_upcast_attn", False),
            ("tie_word_embeddings", True),
        ):
            if data.get(flag, expected) != expected:
                problems.add(flag, f"{data[flag]!r} is not supported (GPT-2 uses {expected!r})")
        problems.raise_if_any(f"{source}: unsupported GPT-2 configuration")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        handled = {"model_type", "activation_function", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                   "reorder_and_upcast_attn", "tie_word_embeddings"}
        extra = {k: v for k, v in data.items() if k not in known and k not in handled}
        try:
            return cls(**kwargs, extra=extra)
        except ConfigError as err:
            raise ConfigError(err.problems, f"{source}: invalid GPT-2 configuration") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` content ``transformers.GPT2LMHeadModel`` expects."""
        data = {k: v for k, v in self.extra.items() if k not in ("architectures", "model_type")}
        core = asdict(self)
        core.pop("extra")
        data.update(core)
        data.update(
            architectures=["GPT2LMHeadModel"],
            model_type="gpt2",
            activation_function="gelu_new",
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
            tie_word_embeddings=True,
        )
        data.setdefault("bos_token_id", 50256)
        data.setdefault("eos_token_id", 50256)
        return data
