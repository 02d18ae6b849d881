"""Every adapter kind against PEFT on one random-weight checkpoint: trainable counts, logits both ways, merged export.

    python sweeps/bench/adapters.py            # a 3-block, 64-wide GPT-2 saved by transformers; seconds on a CPU

For each kind (LoRA, DoRA, PiSSA, gaussian start, rsLoRA, IA3), PEFT's model is built on the checkpoint (non-zero
biases) with its trained tensors moved off their start (B is zero at the start, so an untouched adapter would compare
nothing), saved with ``save_pretrained`` and loaded into ours (``model.peft_format.load_peft_adapter``); ours is saved in PEFT's format
and loaded back with ``peft.PeftModel.from_pretrained``; ours is exported merged and loaded with ``transformers``.
Each max |Δlogit| is printed, with the trainable counts of both, and how far the adapters moved the logits (the
comparisons' scale).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch


def _moved(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_A", "lora_B", "lora_magnitude", "ia3_l")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    import peft
    import transformers

    from model import GPT2
    from model.adapters import adapter_parameters, save_merged
    from model.peft_format import load_peft_adapter, save_peft_adapter

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    lora = {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True, "r": 4, "lora_alpha": 8}
    kinds = {"lora": peft.LoraConfig(**lora), "dora": peft.LoraConfig(**lora, use_dora=True),
             "pissa": peft.LoraConfig(**lora, init_lora_weights="pissa"),
             "gaussian": peft.LoraConfig(**lora, init_lora_weights="gaussian"),
             "rslora": peft.LoraConfig(**lora, use_rslora=True), "ia3": peft.IA3Config(fan_in_fan_out=True)}
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=3, n_head=4, n_embd=64, vocab_size=500,
                                                              n_positions=64, bos_token_id=0, eos_token_id=0))
    with torch.no_grad():  # transformers starts biases at zero: make them count (IA3 rescales them when merged)
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)
    ids = torch.randint(0, 500, (2, 16))
    print(f"{'kind':<9} {'trainable ours':>14} {'PEFT':>8} {'PEFT->ours':>11} {'ours->PEFT':>11} {'merged':>9} "
          f"{'moved':>7}   (max |Δlogit|; moved: adapted vs base)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf.save_pretrained(root / "base")
        for kind, config in kinds.items():
            reference = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(root / "base"), config).eval()
            _moved(reference)
            reference.save_pretrained(root / kind / "peft")
            ours = load_peft_adapter(GPT2.from_pretrained(root / "base").eval(), root / kind / "peft")
            save_peft_adapter(ours, root / kind / "ours")
            back = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(root / "base"),
                                                  root / kind / "ours").eval()
            save_merged(ours, root / kind / "merged")
            merged = transformers.GPT2LMHeadModel.from_pretrained(root / kind / "merged").eval()
            with torch.no_grad():
                mine, theirs = ours(ids), reference(ids).logits
                base = GPT2.from_pretrained(root / "base").eval()(ids)
                row = [(mine - theirs).abs().max(), (back(ids).logits - mine).abs().max(),
                       (merged(ids).logits - mine).abs().max(), (mine - base).abs().max()]
            trainable = sum(p.numel() for _, p in adapter_parameters(ours))
            print(f"{kind:<9} {trainable:>14,} {reference.get_nb_trainable_parameters()[0]:>8,} {row[0]:>11.1e} "
                  f"{row[1]:>11.1e} {row[2]:>9.1e} {row[3]:>7.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
