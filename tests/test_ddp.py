"""DDP on CPU: `cxr train` with two gloo processes, a frozen stage and metrics synced across them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import seed_everything
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cxrkit.config import load_config
from cxrkit.data.dataset import CXRDataModule
from cxrkit.models.factory import create_model
from test_training import make_folder_dataset, write_cli_config

CXR = Path(sys.executable).with_name("cxr")


@pytest.mark.slow
def test_ddp_two_cpu_processes_train_one_epoch(tmp_path):
    data_root = make_folder_dataset(tmp_path / "pneumonia")
    stage = {"name": "layer4+head", "trainable": ["backbone.layer4.*", "head.*"], "epochs": 1}
    config_path = write_cli_config(
        tmp_path,
        data_root,
        name="ddp",
        stages=[stage],
        strategy="ddp",
        devices="2",
        scheduler={"name": "none"},
    )
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(CXR), "train", "-c", str(config_path), "data.loader.batch_size=4"],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (
        "distributed_backend=gloo" in result.stderr
        and "All distributed processes registered" in result.stderr
    )

    run_dir = tmp_path / "runs" / "ddp"
    config = load_config(run_dir / "config.yaml")
    datamodule = CXRDataModule(config.data, config.data.cache.dir, seed=int(config.seed))
    datamodule.setup("fit")
    n_train = len(datamodule.dataset("train"))
    last = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == (n_train // 2) // 4, "each process should see half of the training images"

    # the frozen part (stem, layer1-3, their BatchNorm statistics) is unchanged; layer4 and the head trained
    seed_everything(int(config.seed))
    initial = create_model(config.model, 1).state_dict()
    final = {key[len("model.") :]: value for key, value in last["state_dict"].items()}
    for name, value in initial.items():
        if name.startswith("backbone.layer4") or name.startswith("head"):
            continue
        assert torch.equal(value, final[name]), f"{name} changed although frozen"
    assert not torch.equal(initial["backbone.layer4.0.conv1.weight"], final["backbone.layer4.0.conv1.weight"])

    # the logged validation AUROC covers the whole validation split, gathered from both processes
    model = create_model(config.model, 1)
    model.load_state_dict(
        {
            k[len("model.") :]: v
            for k, v in torch.load(run_dir / "checkpoints/best.ckpt", weights_only=True)["state_dict"].items()
        }
    )
    val = datamodule.dataset("val")
    images, targets = datamodule.eval_batch_transform(val.batch(np.arange(len(val))))
    with torch.no_grad():
        probabilities = model.eval()(images).sigmoid()[:, 0].numpy()
    logged = pd.read_csv(run_dir / "metrics.csv").dropna(subset=["val/auroc_mean"])["val/auroc_mean"].iloc[0]
    assert logged == pytest.approx(roc_auc_score(targets[:, 0].numpy(), probabilities), abs=1e-5)
