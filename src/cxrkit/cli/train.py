"""``cxr train`` (train into a run directory) and ``cxr test`` (evaluate a checkpoint on the test split)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cxrkit.cli.common import checkpoint_option, resolve_config, with_config


@click.command("train")
@with_config
@click.option(
    "--resume",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Continue the run in this directory from checkpoints/last.ckpt, with its saved config.",
)
def train(config_path: str | None, overrides: tuple[str, ...], resume: Path | None) -> None:
    """Train a classifier; one run directory (config output_dir) per run.

    \b
    cxr train -c configs/nih_lite0_offline.yaml train.max_epochs=20
    cxr train --resume runs/nih-lite0
    """
    from cxrkit.training import run

    if resume is not None and (config_path or overrides):
        raise click.UsageError(
            "--resume continues a run with the config saved in its directory; "
            "drop --config and the KEY=VALUE overrides"
        )
    config = None if resume is not None else resolve_config(config_path, overrides)
    run_dir = run.train(config, resume=resume)
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        click.echo(f"run directory: {run_dir}")


@click.command("test")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@checkpoint_option("Which checkpoint of the run to evaluate.")
def test(run_dir: Path, checkpoint: str) -> None:
    """Evaluate a run's checkpoint on the test split; writes RUN_DIR/test_metrics_<checkpoint>.json.

    For the full report with confidence intervals and operating points use `cxr evaluate`."""
    from cxrkit.training import run

    out = run.test(run_dir, checkpoint)
    metrics = json.loads(out.read_text())["metrics"]
    click.echo(f"test AUROC (mean over findings): {metrics.get('test/auroc_mean', float('nan')):.4f}")
    click.echo(f"metrics written to {out}")
