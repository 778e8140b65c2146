"""Running a stack, its jobs: one job of a stacked sweep as the entry point composed it (StackedJob), and the records
each job writes while its stack trains, as its single run would write them (JobRecords). What may differ between a
stack's jobs is stated in mlplab.sweeps.stack_plan; mlplab.sweeps.stack_run trains the stack."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from mlplab.errors import one_line
from mlplab.model.backbones import count_parameters
from mlplab.model.classifier import DivergedError, ImageClassifier
from mlplab.model.stacked_classifier import StackedClassifier
from mlplab.run import provenance
from mlplab.run.checkpoints import read_checkpoint
from mlplab.run.history import EpochHistory, record_val_correct
from mlplab.run.lightning_notes import quiet_lightning
from mlplab.run.records import CHECKPOINT_DIR, LAST_CHECKPOINT, MONITOR, read_metrics, write_metrics
from mlplab.run.trackers import log_run_start
from mlplab.run.train import finished_metrics, report, status_of
from mlplab.run.trainer import build_trainer
from mlplab.run.views.hparams import log_hparams
from mlplab.run.views.network import LearningRate
from mlplab.run.wandb_tracker import end_wandb_runs

log = logging.getLogger(__name__)

VIEWS = "mlplab.run.views"  # the module of the views: what TensorBoard shows beyond the curves
SEARCH = "mlplab.sweeps.search"  # the module of a search trial's report (ReportToStudy: reports each epoch, prunes)


@dataclass
class StackedJob:
    """One job of a stacked sweep, as the entry point composed and checked it."""

    config: Any  # RunConfig
    run_dir: Path
    callbacks: list[Any]
    hparams: dict[str, Any]
    command: list[str]
    logger_for: Callable[[Path | None], Any]  # the job's logger(s), continuing from a checkpoint or not
    train_alone: Callable[[], dict[str, Any]]  # the ordinary way: one job of a sweep


def _loggers(logger: Any) -> list[Any]:
    return [] if not logger else list(logger) if isinstance(logger, list) else [logger]


class JobRecords(Callback):
    """Each stacked job's own records, as its single run would write them: metrics.json and provenance.json at the
    start, its curves after each epoch, its checkpoints with each of the stack's, and at the end its test,
    metrics and HParams row. Its state (each job's history and best checkpoint) is kept in the stack's checkpoint."""

    def __init__(
        self,
        jobs: Sequence[StackedJob],
        models: Sequence[ImageClassifier],
        estimates: Sequence[int],
        resume_from: Path | None,
        log_file: Path,
    ):
        self.jobs, self.models, self.estimates, self.resume_from = (
            list(jobs),
            list(models),
            list(estimates),
            resume_from,
        )
        self.log_file = log_file  # the stack's: where its jobs' training is told
        self.histories = [EpochHistory() for _ in jobs]
        self.loggers = [_loggers(job.logger_for(resume_from)) for job in jobs]
        self.checkpoints = []  # per job: its ModelCheckpoint callbacks (best by val/acc, last)
        for job in jobs:
            callbacks = [callback for callback in job.callbacks if isinstance(callback, ModelCheckpoint)]
            for callback in callbacks:
                callback.dirpath = str(job.run_dir / CHECKPOINT_DIR)
            self.checkpoints.append(callbacks)
        # Per job, its search trial's report (mlplab.sweeps.search.ReportToStudy), if it is a search's trial.
        self.reporters = [next((c for c in job.callbacks if type(c).__module__ == SEARCH), None) for job in jobs]
        self.improved: set[int] = set()  # jobs whose val/acc improved this epoch: their best checkpoint is due
        self.ended: set[int] = set()  # jobs whose records are final (diverged, pruned)
        self.views: dict[int, tuple[L.Trainer, list[Callback]]] = {}  # per job: its view trainer and views
        self.epoch_lr: dict[int, float] = {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "histories": [history.state_dict() for history in self.histories],
            "checkpoints": [[callback.state_dict() for callback in callbacks] for callbacks in self.checkpoints],
            "ended": sorted(self.ended),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for history, state in zip(self.histories, state_dict["histories"]):
            history.load_state_dict(state)
        for callbacks, states in zip(self.checkpoints, state_dict["checkpoints"]):
            for callback, state in zip(callbacks, states):
                callback.load_state_dict(state)
        self.ended = set(state_dict["ended"])

    def alive(self, module: StackedClassifier) -> Iterator[int]:
        stopped = self.ended | module.diverged.keys() | module.pruned.keys()
        return (index for index in range(len(self.jobs)) if index not in stopped)

    def any_alive(self, module: StackedClassifier) -> bool:
        """Whether a job still trains (job 0 among them: ``any`` of the indices would not count it)."""
        return next(self.alive(module), None) is not None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: StackedClassifier) -> None:
        process = provenance.collect([], trainer.strategy.root_device)  # one process runs every job of the stack
        for index in self.alive(pl_module):
            job = self.jobs[index]
            write_metrics(job.run_dir, self._started(index, trainer))
            record = {**process, "command": shlex.join(job.command)}
            provenance.write(job.run_dir, record)
            log_run_start(self.loggers[index], job.config.as_dict(), record, first_attempt=self.resume_from is None)
            # The job's views (mlplab.run.views) see its own trainer: its loggers, at the stack's step and epoch.
            views = [callback for callback in job.callbacks if type(callback).__module__.startswith(VIEWS)]
            with quiet_lightning():
                self.views[index] = (build_trainer(job.config.trainer, job.run_dir, self.loggers[index], views), views)
            if self.resume_from is None:
                self._show(index, trainer, pl_module, "on_fit_start")

    def _show(self, index: int, trainer: L.Trainer, module: StackedClassifier, hook: str) -> None:
        """Call job ``index``'s views' ``hook`` with its own trainer and its network as it is now."""
        view_trainer, views = self.views[index]
        view_trainer.fit_loop.load_state_dict(trainer.fit_loop.state_dict())
        model = self.models[index]
        model.network.load_state_dict(module.stack.network_state(index))
        if hook == "on_validation_end":
            model.epoch_predictions["val"] = module.predictions["val"][index]
        for view in views:
            getattr(view, hook)(view_trainer, model)

    def _started(self, index: int, trainer: L.Trainer) -> dict[str, Any]:
        return {
            "status": "running",
            "precision": str(trainer.precision),
            "num_parameters": count_parameters(self.models[index].network),
            "memory_estimate_bytes": self.estimates[index],
        }

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: StackedClassifier) -> None:
        for history in self.histories:
            history.on_train_epoch_start(trainer, pl_module)
        # A scheduled run's rate as the epoch starts, logged with the epoch's train metrics (LearningRate's, alone).
        self.epoch_lr = {
            index: pl_module.schedules[index]["scheduler"].optimizer.param_groups[0]["lr"]
            for index in self.alive(pl_module)
            if pl_module.schedules[index] is not None
            and any(isinstance(view, LearningRate) for view in self.views[index][1])
        }

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: StackedClassifier) -> None:
        self._end_diverged(trainer, pl_module)
        epoch, rows = trainer.current_epoch, pl_module.epoch_metrics["val"]
        for index in self.alive(pl_module):
            row = rows[index]
            self.histories[index].epochs.append({"epoch": epoch + 1, **row})
            if self.histories[index].last_is_best:
                record_val_correct(self.jobs[index].run_dir, pl_module.predictions["val"][index])
            self._log(index, row, trainer)
            self._show(index, trainer, pl_module, "on_validation_end")
            for callback in self.checkpoints[index]:
                if callback.monitor == MONITOR:
                    score = torch.tensor(row[MONITOR])
                    callback.current_score = score
                    if callback.best_model_score is None or score > callback.best_model_score:
                        self.improved.add(index)
        self._report_to_searches(trainer, pl_module, epoch + 1, rows)
        accuracies = [rows[index][MONITOR] for index in self.alive(pl_module)]
        if accuracies:
            log.info(
                "Stack, epoch %d: %s %.4f to %.4f over %d jobs",
                epoch + 1,
                MONITOR,
                min(accuracies),
                max(accuracies),
                len(accuracies),
            )

    def _report_to_searches(
        self, trainer: L.Trainer, module: StackedClassifier, epoch: int, rows: list[dict[str, float]]
    ) -> None:
        """Each search trial's jobs report the epoch (all first: a trial's seeds are judged on their mean), then
        each pruned job leaves the stack while the others go on; a stack left with no job stops."""
        reporting = {
            index: reporter
            for index in self.alive(module)
            if (reporter := self.reporters[index]) and reporter.metric in rows[index]
        }
        for index, reporter in reporting.items():
            reporter.report(epoch, rows[index][reporter.metric])
        for index, reporter in reporting.items():
            reason = reporter.verdict(epoch)
            if reason:
                log.info("Job %s is pruned and leaves the stack: %s", self.jobs[index].run_dir.name, reason)
                module.prune(index, reason)
                self._end(index, trainer, {**self.histories[index].best(), "status": "pruned", "pruned": reason})
        if not self.any_alive(module):
            trainer.should_stop = True

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: StackedClassifier) -> None:
        pl_module.end_train_epoch()
        self._end_diverged(trainer, pl_module)
        for index in self.alive(pl_module):
            self.histories[index].on_train_epoch_end(trainer, pl_module)
            lr = {"train/lr": self.epoch_lr[index]} if index in self.epoch_lr else {}
            self._log(index, {**pl_module.epoch_metrics["train"][index], **lr}, trainer)
            self._show(index, trainer, pl_module, "on_train_epoch_end")

    def _log(self, index: int, row: dict[str, float], trainer: L.Trainer) -> None:
        for logger in self.loggers[index]:  # at the step and with the epoch Lightning gives a run's epoch metrics
            logger.log_metrics({**row, "epoch": trainer.current_epoch}, step=trainer.global_step - 1)
            logger.save()  # on disk before the epoch's checkpoint, as a single run's (ImageClassifier._log_epoch)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: StackedClassifier, checkpoint: dict[str, Any]) -> None:
        """With each of the stack's checkpoints, each job's: its last, and at an epoch's end its best if improved."""
        self._end_diverged(trainer, pl_module)
        for index in self.alive(pl_module):
            callbacks = self.checkpoints[index]
            paths = {Path(self.jobs[index].run_dir, CHECKPOINT_DIR, LAST_CHECKPOINT)}
            for callback in callbacks:
                path = callback.format_checkpoint_name({})
                if callback.monitor is None:
                    callback.best_model_path = path
                    paths.add(Path(path))
                elif index in self.improved:
                    callback.best_model_score = callback.kth_value = callback.current_score
                    callback.best_model_path = callback.kth_best_model_path = path
                    callback.best_k_models = {path: callback.current_score}
                    paths.add(Path(path))
            job_checkpoint = self._job_checkpoint(index, checkpoint, pl_module)
            for path in sorted(paths):
                trainer.strategy.checkpoint_io.save_checkpoint(job_checkpoint, path)
        self.improved.clear()

    def _job_checkpoint(self, index: int, checkpoint: dict[str, Any], module: StackedClassifier) -> dict[str, Any]:
        """Job ``index``'s checkpoint as its single run would write it at this point."""
        job = {
            key: value
            for key, value in checkpoint.items()
            if key not in ("train_epoch_outputs", "diverged", "pruned", "schedules")
        }
        job["state_dict"] = {f"network.{name}": value for name, value in module.stack.network_state(index).items()}
        job["optimizer_states"] = [module.optimizers().optimizer.network_state_dict(index)]
        job["lr_schedulers"] = module.schedule_states(index)
        job["loops"] = module.network_loops(index, checkpoint["loops"])
        job["hparams_name"], job["hyper_parameters"] = None, dict(self.models[index].hparams)
        job["datamodule_hyper_parameters"] = {
            **checkpoint["datamodule_hyper_parameters"],
            "shuffle_seed": self.jobs[index].config.seed,
        }
        job["callbacks"] = {
            self.histories[index].state_key: self.histories[index].state_dict(),
            **{callback.state_key: callback.state_dict() for callback in self.checkpoints[index]},
            **{key: value for key, value in checkpoint["callbacks"].items() if key == "ResumePoints"},
        }
        outputs = module.epoch_outputs(index)
        if outputs:
            job["train_epoch_outputs"] = outputs
        return job

    def _end_diverged(self, trainer: L.Trainer, module: StackedClassifier) -> None:
        """Write the final records of jobs that diverged since the last look; the others go on."""
        module.check_finite_loss()
        for index, reason in module.diverged.items():
            if index not in self.ended:
                log.warning("Job %s diverged and leaves the stack: %s", self.jobs[index].run_dir.name, reason)
                self._end(index, trainer, {"status": "diverged", "error": f"{DivergedError.__name__}: {reason}"})
        if module.diverged and not self.any_alive(module):  # a stack left with no job stops
            trainer.should_stop = True

    def _end(self, index: int, trainer: L.Trainer, how: dict[str, Any]) -> None:
        """Write job ``index``'s final records, ended as ``how`` says, before the stack's end."""
        self.ended.add(index)
        job = self.jobs[index]
        metrics = {**self._started(index, trainer), **self._record(index, trainer), **how}
        write_metrics(job.run_dir, metrics)
        log_hparams(self.loggers[index], job.hparams, metrics, trainer.global_step)
        end_wandb_runs(self.loggers[index], metrics["status"])

    def _record(self, index: int, trainer: L.Trainer) -> dict[str, Any]:
        best = next(
            (
                callback.best_model_path
                for callback in self.checkpoints[index]
                if callback.monitor is not None and callback.best_model_path
            ),
            None,
        )
        run_dir = self.jobs[index].run_dir
        return {
            **finished_metrics(self.histories[index], trainer.global_step, best, run_dir),
            "stacked_jobs": len(self.jobs),
            "stack_log": os.path.relpath(self.log_file, run_dir),
        }

    def stopped(self, trainer: L.Trainer, error: BaseException, stopped_by: str | None) -> None:
        """The stack stopped before its end: each unfinished job's record says how. Interrupted (a signal, a full
        disk): all resume together from the stack's checkpoint; failed: they start over."""
        status = status_of(error)
        how = {"stopped_by": stopped_by} if stopped_by else {}
        if status != "interrupted":
            how = {"error": f"{type(error).__name__}: {one_line(error)}"}
        for index, job in enumerate(self.jobs):
            if index not in self.ended:
                with contextlib.suppress(OSError):
                    write_metrics(
                        job.run_dir,
                        {**self._started(index, trainer), **self._record(index, trainer), "status": status, **how},
                    )
                end_wandb_runs(self.loggers[index], status)  # resumed, the run goes on; started over, a new one

    def finish(self, trainer: L.Trainer) -> list[dict[str, Any]]:
        """Test each job's best checkpoint, as its single run does but all in one stacked pass over the test split,
        and write each job's final records; returns each job's metrics."""
        testing = [index for index in range(len(self.jobs)) if index not in self.ended]
        metrics, models = {}, {}
        for index in testing:
            job = self.jobs[index]
            metrics[index] = {
                **self._started(index, trainer),
                **self.histories[index].best(),
                **self._record(index, trainer),
            }
            best = metrics[index].get("best_checkpoint")
            path = job.run_dir / best if best else job.run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
            models[index] = ImageClassifier.from_checkpoint(read_checkpoint(path))
        if testing:
            tested = StackedClassifier([models[index] for index in testing])
            with quiet_lightning():
                tester = build_trainer(self.jobs[0].config.trainer, self.log_file.parent, False, [])
                # The stack's data: its test split is every job's, and already where the stack trained.
                tester.test(tested, datamodule=trainer.datamodule, verbose=False)
        for position, index in enumerate(testing):
            model, row = models[index], tested.epoch_metrics["test"][position]
            model.epoch_predictions["test"] = tested.predictions["test"][position]
            # Logged and shown by the job's own trainer at the run's last step and epoch, as after its own fit.
            view_trainer, views = self.views[index]
            view_trainer.fit_loop.load_state_dict(trainer.fit_loop.state_dict())
            view_trainer.datamodule = trainer.datamodule  # the misclassified test images' source
            for logger in self.loggers[index]:
                logger.log_metrics({**row, "epoch": view_trainer.current_epoch}, trainer.global_step)
            for view in views:
                view.on_test_end(view_trainer, model)
            metrics[index] |= {**row, "status": "completed"}
            write_metrics(self.jobs[index].run_dir, metrics[index])
            log_hparams(self.loggers[index], self.jobs[index].hparams, metrics[index], trainer.global_step)
            end_wandb_runs(self.loggers[index], "completed")
            for logger in self.loggers[index]:
                logger.finalize("success")
            report(self.jobs[index].run_dir, metrics[index])
        return [
            metrics[index] if index in metrics else read_metrics(job.run_dir) for index, job in enumerate(self.jobs)
        ]
