"""A tiny GPT-NeoX fine-tuned by transformers.Trainer on CPU (random tokens, no download), with or without a
callback: what the integration tests compare."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB, SEQ = 32, 12


def tiny_model() -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=SEQ, hidden_dropout=0.1,
                           attention_dropout=0.0, tie_word_embeddings=False)
    return GPTNeoXForCausalLM(config)


def token_rows(n: int, *, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = (start + torch.arange(SEQ) * 3) % VOCAB  # a progression the model can learn
    return [{"input_ids": r, "labels": r.clone()} for r in ids]


@dataclass
class Finetune:
    folder: Path
    losses: list[float]
    params: dict[str, torch.Tensor]
    log_history: list[dict]
    sharded: bool = False  # the Trainer's model had FSDP2 (DTensor) parameters


def finetune(folder, *, steps: int, callback=None, attach: bool = True, report_to=("tensorboard",),
             extra_args: dict | None = None, full_params: bool = False) -> Finetune:
    """``steps`` optimizer steps (batch 4, dropout on, so the RNG matters) with ``callback()`` attached."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(folder), max_steps=steps, per_device_train_batch_size=4,
                             per_device_eval_batch_size=4, learning_rate=5e-3, logging_steps=1,
                             report_to=list(report_to), use_cpu=True, save_strategy="no", eval_strategy="no",
                             disable_tqdm=True, seed=0, dataloader_num_workers=0, **(extra_args or {}))
    cb = callback() if callback is not None else None
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=token_rows(64, seed=1),
                      eval_dataset=token_rows(8, seed=2), callbacks=[cb] if cb is not None and not attach else None)
    if cb is not None and attach:
        cb.attach(trainer)
    trainer.train()
    from hessian_core import is_sharded

    history = trainer.state.log_history
    params = {n: (p.full_tensor() if full_params and hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in trainer.model.named_parameters()}  # FSDP2: the whole parameter on every rank
    return Finetune(folder=Path(folder), losses=[e["loss"] for e in history if "loss" in e], params=params,
                    log_history=history, sharded=is_sharded(trainer.model))
