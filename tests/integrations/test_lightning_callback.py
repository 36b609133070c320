"""HessianSpectrumLightningCallback in a real lightning.Trainer fit (the tiny GPT-NeoX on CPU, 20 steps, every 10): the
hessian/* scalars reach the trainer's logger (CSVLogger's metrics.csv) and the Parquet series at steps 10 and 20, and
the training is bitwise that of the same fit without the callback."""

from __future__ import annotations

import csv

import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("lightning")
pytestmark = pytest.mark.xdist_group("lightning_callback")

from tests_integrations_helpers import tiny_model, token_rows  # noqa: E402


def _fit(folder, callback):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_model()
            self.losses = []

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            self.losses.append(loss.detach().clone())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=5e-3)

    def collate(rows):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    L.seed_everything(0, verbose=False)
    module = LM()
    loader = torch.utils.data.DataLoader(token_rows(64, seed=1), batch_size=4, shuffle=True, collate_fn=collate)
    trainer = L.Trainer(max_steps=20, accelerator="cpu", devices=1, logger=CSVLogger(str(folder)),
                        default_root_dir=str(folder), callbacks=[callback] if callback else [],
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, loader)
    return module, trainer


def test_lightning_callback_logs_and_leaves_training_untouched(tmp_path):
    from hessian_core.integrations import HessianSpectrumLightningCallback

    held_out = [{"input_ids": torch.stack([r["input_ids"] for r in token_rows(4, seed=2)])}]
    callback = HessianSpectrumLightningCallback(every_steps=10, batches=held_out, probes=1, steps=6, eps=1e-3)
    with_cb, trainer = _fit(tmp_path / "with", callback)
    without, _ = _fit(tmp_path / "without", None)
    assert torch.equal(torch.stack(with_cb.losses), torch.stack(without.losses))
    for (name, p), q in zip(with_cb.named_parameters(), without.parameters()):
        assert torch.equal(p, q), name
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("hessian/lambda_max")]
    assert [int(r["step"]) for r in rows] == [10, 20]
    assert all(float(r["hessian/lambda_max"]) > 0 and r["hessian/block_diagonal_error"] for r in rows)
    table = pq.read_table(tmp_path / "with" / "hessian_timeseries.parquet").to_pylist()
    assert [r["step"] for r in table] == [10, 20]
    assert [r["lambda_max"] for r in table] == [float(r["hessian/lambda_max"]) for r in rows]
