"""Training from incomplete data: fixed observation masks and ignored missing values."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from masked_diffusion import (
    BinaryImageDataset,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    TensorBatchLoader,
    Trainer,
    TrainerConfig,
    load_dataset,
    load_dataset_from_config,
    load_model,
)

TINY_MODEL = ModelConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, num_groups=4)


def _mask_digest(mask: torch.Tensor) -> str:
    return hashlib.sha256(mask.numpy().tobytes()).hexdigest()


def test_obs_mask_same_across_epochs() -> None:
    dataset = load_dataset("mnist-sample", "train", p_missing=0.5, mask_seed=3).subset(range(64))
    loader = TensorBatchLoader(dataset, 16, shuffle=True, seed=0)
    seen: dict[int, torch.Tensor] = {}
    for epoch in range(3):
        loader.set_epoch(epoch)
        order = loader.epoch_indices()
        batches = [mask for _, mask in loader]
        for index, mask in zip(order.tolist(), torch.cat(batches), strict=True):
            if index in seen:
                assert torch.equal(seen[index], mask), f"image {index} changed in epoch {epoch}"
            seen[index] = mask
    assert len(seen) == 64


def test_obs_mask_same_in_dataloader_workers() -> None:
    dataset = load_dataset("mnist-sample", "heldout", p_missing=0.75, mask_seed=1)
    loader = DataLoader(dataset, batch_size=50, shuffle=False, num_workers=2)
    masks = torch.cat([mask for _, mask in loader])
    assert torch.equal(masks, dataset.obs_mask)


def test_obs_mask_same_in_new_process() -> None:
    """A resumed run rebuilds its dataset in a new process and gets the same masks."""
    config = DataConfig(p_missing=0.5, mask_seed=7)
    here = _mask_digest(load_dataset_from_config(config, "train").obs_mask)
    script = (
        "import hashlib; from masked_diffusion import DataConfig, load_dataset_from_config; "
        "m = load_dataset_from_config(DataConfig(p_missing=0.5, mask_seed=7), 'train').obs_mask; "
        "print(hashlib.sha256(m.numpy().tobytes()).hexdigest())"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == here


def test_obs_mask_differs_between_images() -> None:
    dataset = load_dataset("mnist-sample", "train", p_missing=0.5)
    flat = dataset.obs_mask.flatten(1)
    assert len({_mask_digest(row) for row in flat[:200]}) == 200


def _tiny_config(output_dir: Path, p_missing: float) -> ExperimentConfig:
    return ExperimentConfig(
        data=DataConfig(p_missing=p_missing, batch_size=16, eval_batch_size=32),
        model=TINY_MODEL,
        trainer=TrainerConfig(
            output_dir=str(output_dir),
            epochs=1,
            max_steps=3,
            num_sample_images=0,
            progress_bar=False,
            device="cpu",
        ),
    )


def _train(config: ExperimentConfig, train: BinaryImageDataset) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    from masked_diffusion import MaskedDiffusionModel

    model = MaskedDiffusionModel.from_config(config)
    Trainer(model, config, train_data=train).fit()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trainer_ignores_missing_values(tmp_path: Path) -> None:
    """Weights after training are bit-identical whatever the missing pixels hold."""
    source = load_dataset("mnist-sample", "train", p_missing=0.6).subset(range(48))
    scrambled_images = torch.where(
        source.obs_mask, source.images, torch.randint_like(source.images, 0, 3)
    )
    scrambled = BinaryImageDataset(scrambled_images, source.obs_mask, source.labels)
    assert not torch.equal(scrambled.images, source.images)

    first = _train(_tiny_config(tmp_path / "a", 0.6), source)
    second = _train(_tiny_config(tmp_path / "b", 0.6), scrambled)
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def test_ambient_run_logs_both_bounds(tmp_path: Path) -> None:
    config = _tiny_config(tmp_path / "run", 0.5)
    config = config.replace(
        trainer=TrainerConfig(
            output_dir=str(tmp_path / "run"),
            epochs=1,
            num_sample_images=4,
            progress_bar=False,
            device="cpu",
        )
    )
    train = load_dataset("mnist-sample", "train", p_missing=0.5).subset(range(32))
    heldout = load_dataset("mnist-sample", "heldout", p_missing=0.5).subset(range(16))
    clean = BinaryImageDataset(heldout.images, torch.ones_like(heldout.obs_mask), heldout.labels)
    from masked_diffusion import MaskedDiffusionModel

    model = MaskedDiffusionModel.from_config(config)
    Trainer(model, config, train_data=train, val_data=heldout, clean_val_data=clean).fit()

    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    epoch_records = [r for r in records if "val_obs_nll" in r]
    assert epoch_records, "no epoch record with val_obs_nll"
    assert "val_nll" in epoch_records[-1]
    # Fewer pixels are scored in the corrupted images, so their bound is smaller.
    assert epoch_records[-1]["val_obs_nll"] < epoch_records[-1]["val_nll"]
    pictures = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert any("completion" in name for name in pictures), pictures

    restored = load_model(tmp_path / "run")
    completions = restored.impute(heldout.images, heldout.obs_mask, steps=5)[:, 0]
    assert torch.equal(completions[heldout.obs_mask], heldout.images[heldout.obs_mask])
