"""The study report: trials table and Optuna's plots as PNG files and one HTML page (plus Markdown).

Plots come from :mod:`optuna.visualization.matplotlib`: optimisation history, per-epoch learning curves
(where pruning stopped trials), parameter importances (fANOVA), parallel coordinates and the timeline of the
workers' trials. A plot that the study cannot support yet (e.g. importances before two completed trials) is
replaced by a note saying why.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from optuna import Study
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from cxrkit.reporting.html import Report
from cxrkit.tuning.objective import trial_error
from cxrkit.tuning.space import SearchSpace

log = logging.getLogger(__name__)


def trials_frame(study: Study) -> pd.DataFrame:
    """One row per trial: number, state, value, epochs, duration, start, worker, parameters, error."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                "value": trial.value,
                "epochs": trial.user_attrs.get("epochs"),
                "duration_s": duration,
                "started": trial.datetime_start.isoformat(timespec="seconds") if trial.datetime_start else "",
                "worker": trial.user_attrs.get("worker", ""),
                **{f"params.{name}": value for name, value in trial.params.items()},
                "error": trial_error(trial),
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    ordered = [column for column in frame.columns if column != "error"] + ["error"]
    return frame[ordered]


def write_study_report(study: Study, out_dir: str | Path, space: SearchSpace | None = None) -> Path:
    """Write ``report.html``, ``report.md``, ``trials.csv`` and the PNG plots into ``out_dir``."""
    metric = study.user_attrs.get("cxrkit.metric", "objective")
    report = Report(
        f"Hyperparameter study {study.study_name}",
        subtitle=f"{metric}, {study.direction.name.lower()}d by Optuna",
    )
    frame = trials_frame(study)
    _summary(report, study, frame, metric)
    if space is not None:
        report.heading("Search space")
        rows = [{"field": param.path, "distribution": param.describe()} for param in space.params]
        rows += [{"field": path, "distribution": f"fixed = {value!r}"} for path, value in space.fixed.items()]
        report.table(pd.DataFrame(rows), caption=f"From {space.source}")
    report.heading("Plots")
    for name, title, caption, plot in _plots():
        _add_plot(report, study, name, title, caption, plot)
    report.heading("Trials")
    if frame.empty:
        report.paragraph("No trial has run yet.")
    else:
        report.table(
            frame,
            caption="Every trial (value = best epoch's metric; error = why a trial failed)",
            name="trials",
            float_format="{:.4g}",
        )
    return report.write(out_dir)


def _summary(report: Report, study: Study, frame: pd.DataFrame, metric: str) -> None:
    report.heading("Summary")
    counts = frame["state"].value_counts().to_dict() if not frame.empty else {}
    report.paragraph(
        f"{len(frame)} trials: "
        + ", ".join(f"{count} {state.lower()}" for state, count in sorted(counts.items()))
        + "."
    )
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        report.callout(
            f"Best trial #{best.number}: {metric} = {best.value:.4f} after "
            f"{best.user_attrs.get('epochs', '?')} epoch(s).",
            "ok",
        )
        params = pd.DataFrame(
            {"parameter": list(best.params), "value": [repr(v) for v in best.params.values()]}
        )
        report.table(params, caption="Parameters of the best trial")
    else:
        report.callout("No trial has completed yet, so there is no best configuration.", "warning")
    failed = counts.get(TrialState.FAIL.name, 0)
    if failed:
        report.callout(f"{failed} trial(s) failed; their errors are in the trials table.", "warning")


def _add_plot(
    report: Report, study: Study, name: str, title: str, caption: str, plot: Callable[[Study], object]
) -> None:
    import matplotlib.pyplot as plt

    report.heading(title, level=3)
    try:
        with plt.style.context("default"), warnings.catch_warnings():  # optuna switches the global style
            warnings.simplefilter("ignore", ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)  # cosmetic (flat axes, equal importances)
            axes = plot(study)
            figure = _figure_of(axes)
    except (ValueError, RuntimeError, ZeroDivisionError) as error:
        report.callout(f"{title} not available: {error}", "info")
        return
    try:
        if not figure.axes or not any(ax.has_data() for ax in figure.axes):
            report.callout(f"{title}: nothing to plot yet.", "info")
        else:
            report.figure(figure, name, caption=caption)
    finally:
        plt.close(figure)


def _figure_of(axes: object) -> Figure:
    if hasattr(axes, "figure"):
        return axes.figure  # type: ignore[attr-defined]
    return next(iter(axes.flat)).figure  # type: ignore[attr-defined]


def _plots() -> list[tuple[str, str, str, Callable[[Study], object]]]:
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as vis

    return [
        (
            "optimization_history",
            "Optimisation history",
            "Value of every completed trial and the best so far",
            vis.plot_optimization_history,
        ),
        (
            "learning_curves",
            "Learning curves",
            "Validation metric per epoch; pruned trials stop early",
            _learning_curves,
        ),
        (
            "param_importances",
            "Parameter importances",
            "fANOVA importance of each parameter for the value",
            partial(vis.plot_param_importances, evaluator=FanovaImportanceEvaluator(seed=0)),
        ),
        (
            "parallel_coordinates",
            "Parallel coordinates",
            "Parameters of each completed trial, coloured by value",
            vis.plot_parallel_coordinate,
        ),
        ("timeline", "Timeline", "When each trial ran, by state", vis.plot_timeline),
    ]


def _learning_curves(study: Study) -> object:
    """Optuna's intermediate values plot, labelled for epochs and the study's metric."""
    from optuna.visualization.matplotlib import plot_intermediate_values

    axes = plot_intermediate_values(study)
    axes.set_xlabel("epoch")
    axes.set_ylabel(study.user_attrs.get("cxrkit.metric", "intermediate value"))
    axes.set_title("Learning curves")
    return axes
