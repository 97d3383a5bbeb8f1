"""What the stage notebooks (02 pre-train, 03 fine-tune, 03b distill) share, so each reads as its steps only.

    plan = plan_stage("finetune", run_dir, preset="cpu-demo", overrides=["train.max_steps=20"])
    plan.table()                                   # the resolved config, validated before any work
    result = run_stage(plan)                       # live loss curve in JupyterLab; resumes after an interruption
    loss_figure(read_metrics(result.output_dir)).show(); throughput_table(read_metrics(result.output_dir))
    table, by_lang, fig = score_change(before, after)   # before/after dev scores (from kalm_lib.evaluation)

The notebooks evaluate through :mod:`kalm_lib.evaluation` themselves; this module does not import it (train and
evaluation are sibling stages). pandas, plotly and IPython are imported where used: the trainer's own
processes (``kalm train``, torchrun workers) import this package without needing them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kalm_lib.config import REPO_ROOT, resolve_config
from kalm_lib.runtime import is_headless
from kalm_lib.train.config import StageConfig, load_config
from kalm_lib.train.launch import launch, run_dir_overrides
from kalm_lib.train.loop import TrainResult

# metrics.jsonl columns worth a summary after a stage (those present)
THROUGHPUT_COLUMNS = ("pairs_per_s", "tokens_per_s", "step_time_s", "padding_fraction", "memory_mb",
                      "focal_weight_mean", "loss_kl")


def notebook_setup() -> None:
    """Figures embedded in exported HTML (plotly.js inline), and the model hub offline unless set otherwise."""
    import plotly.io as pio

    pio.renderers.default = "notebook+plotly_mimetype"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@dataclass
class StagePlan:
    """A stage placed in a run directory: its config file, the overrides on top, the validated config."""

    stage: str
    run_dir: Path
    config_path: Path
    overrides: list[str] = field(default_factory=list)
    config: StageConfig | None = None

    @property
    def eval_dir(self) -> Path:
        """Where the notebook's before/after checks go (``train/<stage>/eval``; the report keeps ``eval/``)."""
        return self.run_dir / "train" / self.stage / "eval"

    @property
    def start_name(self) -> str:
        return f"kalm/{self.stage}-start"

    @property
    def end_name(self) -> str:
        return f"kalm/{self.stage}"

    def table(self):
        """The knobs worth seeing before a run, as a one-column frame."""
        import pandas as pd

        c = self.config
        shown = self.config_path.relative_to(REPO_ROOT) if self.config_path.is_relative_to(REPO_ROOT) else self.config_path
        return pd.DataFrame([{
            "config": str(shown), "model": c.model.name_or_path, "data": c.data.train_file,
            "output_dir": c.output_dir, "steps": c.train.max_steps, "global batch": c.train.batch_size,
            "lr": c.train.lr, "tau": c.loss.temperature, "hard negs": c.loss.num_hard_negatives,
            "focal": c.loss.focal_gamma, "mixing": c.loss.mix_mode, "MRL dims": c.loss.matryoshka_dims,
            "KL weight": c.loss.distill_weight_kl}]).T.rename(columns={0: self.stage})


def plan_stage(stage: str, run_dir: str | os.PathLike, *, preset: str, config: str | os.PathLike | None = None,
               overrides: list[str] | tuple[str, ...] = (), seed: int = 0, start_from: str | None = "auto",
               teacher: str | None = None) -> StagePlan:
    """Resolve a stage's config: ``config`` (a path) or ``configs/train/<preset>/<stage>.yaml``, with the run
    directory's paths (:func:`run_dir_overrides`), ``train.seed``, ``overrides``, then ``teacher`` on top.

    The config is loaded and validated here: unknown keys and bad values stop the notebook at this cell.
    """
    run_dir = Path(run_dir).resolve()
    config_path = resolve_config(config or f"{preset}/{stage}", "train")
    placed = run_dir_overrides(run_dir, stage, start_from=start_from)
    all_overrides = [f"{k}={v}" for k, v in placed.items()] + [f"train.seed={seed}", *overrides]
    if teacher:
        all_overrides.append(f"distill.teacher={teacher}")
    return StagePlan(stage=stage, run_dir=run_dir, config_path=config_path, overrides=all_overrides,
                     config=load_config(config_path, all_overrides))


def run_stage(plan: StagePlan, *, num_processes: int | None = None, accelerate_config: str | None = None) -> TrainResult:
    """Train the planned stage (:func:`launch`), with a live loss curve when someone is watching; prints a line."""
    callbacks = []
    if not is_headless():  # widgets do not render in exported HTML
        from IPython.display import display

        widget, on_step = live_loss_plot(f"{plan.stage} (live)")
        display(widget)
        callbacks.append(on_step)
    result = launch(plan.config_path, plan.overrides, num_processes=num_processes,
                    accelerate_config=accelerate_config, callbacks=callbacks)
    resumed = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
    print(f"{result.steps} steps -> {result.final_model}{resumed}")
    return result


# ============================================================================================ metrics
def read_metrics(output_dir: str | os.PathLike):
    """``<output_dir>/metrics.jsonl`` as a pandas frame (one row per logged step)."""
    import pandas as pd

    path = Path(output_dir) / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return pd.DataFrame(rows)


def throughput_table(metrics):
    """Mean, min and max of the throughput/memory columns of :func:`read_metrics`."""
    cols = [c for c in THROUGHPUT_COLUMNS if c in metrics]
    return metrics[cols].describe().loc[["mean", "min", "max"]].round(3)


def loss_figure(metrics, title: str = "training"):
    """A plotly figure of loss (and positive accuracy, right axis) against step, from :func:`read_metrics`."""
    import plotly.graph_objects as go

    fig = go.Figure()
    if len(metrics):
        fig.add_scatter(x=metrics["step"], y=metrics["loss"], name="loss", mode="lines")
        if "accuracy" in metrics:
            fig.add_scatter(x=metrics["step"], y=metrics["accuracy"], name="positive accuracy", mode="lines",
                            yaxis="y2", line={"dash": "dot"})
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss", template="plotly_white", height=380,
                      yaxis2={"title": "accuracy", "overlaying": "y", "side": "right", "range": [0, 1]})
    return fig


def live_loss_plot(title: str = "training (live)"):
    """``(widget, callback)``: a plotly FigureWidget that ``callback(metrics_row)`` extends step by step.

    Pass ``callback`` to :func:`~kalm_lib.train.train`/:func:`launch`; display ``widget`` first. In a headless
    run (papermill) widgets do not render, so show :func:`loss_figure` after training as well.
    """
    import plotly.graph_objects as go

    widget = go.FigureWidget(loss_figure([], title))
    widget.add_scatter(x=[], y=[], name="loss", mode="lines")
    widget.add_scatter(x=[], y=[], name="positive accuracy", mode="lines", yaxis="y2", line={"dash": "dot"})

    def callback(row: dict[str, Any]) -> None:
        with widget.batch_update():
            widget.data[0].x = (*widget.data[0].x, row["step"])
            widget.data[0].y = (*widget.data[0].y, row["loss"])
            widget.data[1].x = (*widget.data[1].x, row["step"])
            widget.data[1].y = (*widget.data[1].y, row.get("accuracy"))

    return widget, callback


# ============================================================================================ before / after
def score_change(before, after, title: str = "dev score change (points)"):
    """``(table, by_lang, figure)``: per-task scores of two evaluations side by side with their difference.

    ``before`` / ``after``: per-task score frames (``run``, ``lang``, ``task_type``, ``task``, ``main_score``;
    e.g. :func:`kalm_lib.evaluation.evaluate_model` with ``name=`` the run label). ``table`` has one row per
    (lang, task type, task) and the columns ``<before run>``, ``<after run>``, ``delta``; ``by_lang`` their
    means per language; the figure is ``delta`` per task.
    """
    import pandas as pd
    import plotly.express as px

    start, end = before["run"].iloc[0], after["run"].iloc[0]
    both = pd.concat([before, after])
    table = both.pivot_table(index=["lang", "task_type", "task"], columns="run", values="main_score")[[start, end]]
    table["delta"] = table[end] - table[start]
    by_lang = table.groupby(level="lang")[[start, end, "delta"]].mean().round(2)
    fig = px.bar(table.reset_index(), x="task", y="delta", color="lang", title=title)
    fig.update_layout(template="plotly_white", height=380)
    return table.round(2), by_lang, fig
