"""Curvature in a Hugging Face Trainer fine-tune: a tiny GPT-NeoX learns noisy arithmetic progressions on CPU while
``HessianSpectrumCallback`` measures its Hessian every ``--every`` steps; the ``hessian/*`` scalars land in
TensorBoard beside the loss, and this script reads them back and plots them.

    pip install -e ".[hf]"
    python examples/hf_trainer_callback.py --out runs/hf_callback --plot docs/hf_trainer_callback.png
    tensorboard --logdir runs/hf_callback/runs          # or: hessian-spectrum plot runs/hf_callback/hessian_timeseries.parquet

The callback logs through ``Trainer.log``, so ``report_to`` decides where the scalars go (TensorBoard here; W&B,
MLflow, ... alike); it also writes ``hessian_timeseries.parquet`` in the output folder. The training is bitwise the
one without the callback (tests/integrations/test_hf_callback.py checks it).
"""

from __future__ import annotations

import argparse
import glob
import os

import torch

VOCAB, SEQ_LEN = 64, 24


def sequences(n: int, *, seed: int) -> list[dict]:
    """Noisy arithmetic progressions mod VOCAB (as examples/fsdp_timeseries.py): learnt within a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 5, (n, 1), generator=g)
    seq = (start + stride * torch.arange(SEQ_LEN)) % VOCAB
    noise = torch.rand(n, SEQ_LEN, generator=g) < 0.05
    ids = torch.where(noise, torch.randint(0, VOCAB, (n, SEQ_LEN), generator=g), seq)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def build_model() -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=SEQ_LEN, tie_word_embeddings=False)
    return GPTNeoXForCausalLM(config)


def read_scalars(folder: str) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar in the TensorBoard event files under ``folder``: tag -> (steps, values), read with
    TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(path, size_guidance={"scalars": 0}, purge_orphaned_data=False)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: (sorted(v), [v[s] for s in sorted(v)]) for tag, v in out.items()}


def plot(scalars: dict, path: str) -> None:
    """The training loss and the hessian/* scalars against the step, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("train/loss", "training loss"), ("train/hessian/lambda_max", "lambda_max"),
              ("train/hessian/trace", "trace"), ("train/hessian/block_diagonal_error", "block-diagonal error")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (tag, title) in zip(axes, panels):
        steps, values = scalars[tag]
        ax.plot(steps, values, marker="o" if "hessian" in tag else None, ms=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("HessianSpectrumCallback in a Trainer fine-tune (TensorBoard scalars read back)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    from transformers import Trainer, TrainingArguments

    from hessian_core.integrations import HessianSpectrumCallback

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/hf_callback")
    p.add_argument("--steps", type=int, default=200, help="training steps")
    p.add_argument("--every", type=int, default=20, help="measure the Hessian every this many steps")
    p.add_argument("--probes", type=int, default=2)
    p.add_argument("--lanczos-steps", type=int, default=12)
    p.add_argument("--plot", default=None, help="write the TensorBoard scalars' figure here (PNG)")
    args = p.parse_args()

    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=16,
                                 learning_rate=3e-3, logging_steps=5, report_to=["tensorboard"], use_cpu=True,
                                 save_strategy="no", disable_tqdm=True, seed=0)
    trainer = Trainer(model=build_model(), args=training, train_dataset=sequences(2048, seed=0),
                      eval_dataset=sequences(16, seed=1))
    HessianSpectrumCallback(every_steps=args.every, eval_batches=2, probes=args.probes,
                            steps=args.lanczos_steps).attach(trainer)
    trainer.train()
    if args.plot:
        plot(read_scalars(args.out), args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
