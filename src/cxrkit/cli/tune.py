"""``cxr tune``: Optuna hyperparameter search over any config field; writes a ready-to-train best config."""

from __future__ import annotations

import shlex
from pathlib import Path

import click
from omegaconf import OmegaConf

from cxrkit.cli.common import config_option, overrides_argument

STUDY_PREFIX = "study."


@click.command("tune")
@config_option
@click.option(
    "--space",
    "-s",
    "space_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Search space YAML (see configs/spaces/).",
)
@click.option(
    "--trials",
    "-n",
    required=True,
    type=click.IntRange(min=0),
    help="Target number of completed or pruned trials of the study, all workers together.",
)
@click.option("--study-name", default=None, help="Study name (default: <config name>-tune).")
@click.option(
    "--storage",
    default=None,
    help="Optuna storage URL shared by the workers: default sqlite:///<study dir>/study.db; "
    "postgresql+psycopg2://user:pw@host/db for many machines; journal:///shared/fs/study.log.",
)
@click.option(
    "--study-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Where trials, best_config.yaml, the report and the MLflow store go (default: the config's "
    "output_dir when the config file or an override sets it, else runs/studies/<study name>).",
)
@click.option(
    "--timeout",
    default=None,
    type=click.FloatRange(min=0),
    help="This worker starts no new trial after this many seconds.",
)
@click.option(
    "--workers-note",
    is_flag=True,
    help="Print how to start more workers on this study (same study, many processes/machines), exit.",
)
@overrides_argument
def tune(
    config_path: str | None,
    space_path: str,
    trials: int,
    study_name: str | None,
    storage: str | None,
    study_dir: str | None,
    timeout: float | None,
    workers_note: bool,
    overrides: tuple[str, ...],
) -> None:
    """Search hyperparameters with Optuna (TPE, pruning) and write the best trial's config.

    KEY=VALUE overrides change the base config of every trial (e.g. train.max_epochs=5 for short trials);
    study.KEY=VALUE overrides change the space file's study settings (e.g. study.pruner=hyperband).
    Re-running the same command continues an interrupted study; several workers started with the same
    --study-name and --storage share the study. Train the result with
    `cxr train -c <study dir>/best_config.yaml` (it has the searched values, without shortcuts such as
    train.limit_train_batches that only made the trials short).
    """
    import optuna

    from cxrkit.tuning.space import SpaceError, load_space
    from cxrkit.tuning.study import (
        default_storage_url,
        default_study_dir,
        default_study_name,
        describe,
        load_base_config,
        run_study,
    )

    config_overrides = tuple(item for item in overrides if not item.startswith(STUDY_PREFIX))
    settings = _study_overrides([item for item in overrides if item.startswith(STUDY_PREFIX)])
    config = load_base_config(config_path, config_overrides)
    try:
        space = load_space(space_path, settings)
    except SpaceError as error:
        raise click.UsageError(str(error)) from error
    name = study_name or default_study_name(config)
    if study_dir:
        directory = Path(study_dir)
    elif _sets_output_dir(config_path, config_overrides):
        directory = Path(config.output_dir)
    else:
        directory = default_study_dir(config, name)
    if workers_note:
        url = storage or default_storage_url(directory)
        click.echo(_workers_note(name, url, directory, trials, config_path, space_path, overrides))
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # trials are logged by cxrkit, once each
    try:
        result = run_study(
            config, space, trials, study_name=name, storage=storage, study_dir=directory, timeout=timeout
        )
    except (SpaceError, ValueError) as error:
        raise click.UsageError(str(error)) from error
    except KeyboardInterrupt as stop:
        raise click.ClickException("interrupted; re-run the same command to continue the study") from stop
    click.echo(describe(result))


def _sets_output_dir(config_path: str | None, overrides: tuple[str, ...]) -> bool:
    """Whether the config file or an override names ``output_dir`` (then it is the study directory)."""
    if any(item.partition("=")[0].strip() == "output_dir" for item in overrides):
        return True
    return config_path is not None and "output_dir" in (OmegaConf.load(config_path) or {})


def _study_overrides(items: list[str]) -> dict[str, object]:
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item[len(STUDY_PREFIX) :] for item in items]))
    except Exception as error:
        raise click.UsageError(f"invalid study.* override in {items}: {error}") from error
    return dict(parsed)  # type: ignore[arg-type]


def _workers_note(
    name: str,
    url: str,
    study_dir: Path,
    trials: int,
    config_path: str | None,
    space_path: str,
    overrides: tuple[str, ...],
) -> str:
    from cxrkit.tuning.study import redact

    argv = ["cxr", "tune"]
    argv += ["-c", str(Path(config_path).resolve())] if config_path else []
    argv += [
        "-s",
        str(Path(space_path).resolve()),
        "-n",
        str(trials),
        "--study-name",
        name,
        "--storage",
        url,
        "--study-dir",
        str(study_dir.resolve()),
        *overrides,
    ]
    hidden = redact(url) != url
    lines = [
        f"Study {name!r}: storage {redact(url)}, study directory {study_dir.resolve()}.",
        f"Each worker runs trials until the study holds {trials} completed or pruned trials. Start one with:",
        f"  {shlex.join([redact(arg) if arg == url else arg for arg in argv])}",
        "One per GPU:     CUDA_VISIBLE_DEVICES=<i> cxr tune ... (same arguments)",
        'SLURM job array: sbatch --array=1-<workers> --gres=gpu:1 --wrap "cxr tune ... (same arguments)"',
    ]
    if hidden:
        lines.append("(password hidden: put it back, or use a ~/.pgpass file)")
    if url.startswith("sqlite"):
        lines.append(
            "Storage: SQLite suits a few workers on this machine. For several machines pass --storage "
            "postgresql+psycopg2://USER:PASSWORD@HOST/DB (or journal:///<shared fs>/study.log) and a "
            "--study-dir on a shared file system."
        )
    else:
        lines.append(
            "Storage is shared: workers may run on any machine that reaches it. Keep --study-dir on a "
            "shared file system, or set study.tracking_uri to a shared MLflow server."
        )
    lines.append(
        "A killed worker's running trial is marked FAIL after study.grace_period seconds; re-run the "
        "command to continue the study."
    )
    return "\n".join(lines)
