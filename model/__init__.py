"""GPT-2 from scratch: the model, its checkpoints and its tokenizer. Knows nothing of tasks or Ray."""

from model.checkpoint import CheckpointError, NonFiniteWeightsError
from model.config import PRESETS, ConfigError, GPT2Config
from model.gpt2 import GPT2, KVCache, eval_mode, last_token_hidden
from model.tokenizer import EOT_TOKEN_ID, TokenizerError, get_tokenizer

__all__ = [
    "EOT_TOKEN_ID",
    "GPT2",
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "GPT2Config",
    "KVCache",
    "NonFiniteWeightsError",
    "TokenizerError",
    "eval_mode",
    "get_tokenizer",
    "last_token_hidden",
]
