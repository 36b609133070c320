"""Curvature during fine-tuning: train a tiny Llama with FSDP2 and record its Hessian spectrum every N steps.

    torchrun --nproc_per_node 2 examples/fsdp_timeseries.py --out runs/timeseries
    hessian-spectrum plot runs/timeseries/timeseries.parquet

Every rank trains on its own slice of each batch (gloo on CPU, nccl with --cuda). Every ``--every`` steps all
ranks call ``hessian_core.analyze`` on a fixed held-out set whose first tokens are a "prompt" (labels -100);
rank 0 appends one row (``step``, ``lambda_max``, ``trace``, ``outlier_count``, ``whole_block_rel_error``, ...)
to ``timeseries.parquet``. The analysis leaves the training state untouched (mode, gradients, RNG), so the
run trains exactly as it would without it.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from hessian_core import analyze, append_row, causal_lm_loss, shard_model

VOCAB, SEQ_LEN, PROMPT = 64, 24, 4


def sequences(n: int, *, seed: int) -> torch.Tensor:
    """Noisy arithmetic progressions mod VOCAB: a pattern a tiny model learns within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 5, (n, 1), generator=g)
    seq = (start + stride * torch.arange(SEQ_LEN)) % VOCAB
    noise = torch.rand(n, SEQ_LEN, generator=g) < 0.05
    return torch.where(noise, torch.randint(0, VOCAB, (n, SEQ_LEN), generator=g), seq)


def analysis_set(rank: int, world: int, device: torch.device) -> list[dict]:
    """2 held-out batches of 8 sequences; this rank's rows; the prompt tokens do not count in the loss."""
    out = []
    for k in range(2):
        ids = sequences(8, seed=1000 + k)[rank::world].to(device)
        labels = ids.clone()
        labels[:, :PROMPT] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def build_model(device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # every rank builds the same weights before sharding
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/timeseries")
    p.add_argument("--steps", type=int, default=60, help="training steps")
    p.add_argument("--every", type=int, default=15, help="analyse every this many steps (and at the end)")
    p.add_argument("--probes", type=int, default=2)
    p.add_argument("--lanczos-steps", type=int, default=12)
    p.add_argument("--cuda", action="store_true")
    args = p.parse_args()

    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.cuda else torch.device("cpu")
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh

    model = shard_model(build_model(device), mesh=init_device_mesh(device.type, (world,)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    held_out = analysis_set(rank, world, device)
    series = os.path.join(args.out, "timeseries.parquet")
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        if os.path.exists(series):
            os.unlink(series)  # a fresh series for a fresh run
    model.train()
    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            result = analyze(model, held_out, probes=args.probes, steps=args.lanczos_steps, blocks=True)
            if rank == 0:
                append_row(series, {"step": step, **result.summary()})
                print(f"step {step:4d}  loss {result.loss:.4f}  lambda_max {result.lambda_max:.4g}  "
                      f"trace {result.trace:.4g}  block-diagonal error {result.whole_block_rel_error:.3f}", flush=True)
        if step == args.steps:
            break
        batch = sequences(16, seed=step)[rank::world].to(device)
        causal_lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
