"""A trial of several seeds (hydra.sweeper.seeds_per_trial) is worth, at each epoch, the mean of its seeds' values
at that epoch, whichever seed gets there first: each seed's job reports through its own connection to the study,
as parallel and SLURM jobs do. Values are powers of two, so the means are exact; the study is read with Optuna."""

import optuna
from conftest import study_of

from mlplab.sweeps.search import ReportToStudy, trial_callback
from mlplab.sweeps.storage import STUDY_FILE, StudyAddress


def study_with_one_trial(sweep_dir, storage=None) -> optuna.Study:
    storage = storage or optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(sweep_dir / STUDY_FILE))
    )
    study = optuna.create_study(study_name=sweep_dir.name, storage=storage, direction="maximize")
    study.ask()
    return study


def test_a_slow_seeds_epoch_is_judged_on_that_epochs_mean(tmp_path):
    """As a stack would (both seeds report epoch 1 before either is judged), the trial is pruned at epoch 1, though
    the fast seed reported epochs 2 and 3 before the slow one finished its first."""
    study_with_one_trial(tmp_path)
    address, pruner = StudyAddress.of(None, None, tmp_path), optuna.pruners.ThresholdPruner(lower=0.3)
    fast, slow = (trial_callback(address, 0, "val/acc", pruner, seed, seeds_per_trial=2) for seed in (42, 43))
    for epoch, value in [(1, 0.5), (2, 0.625), (3, 0.75)]:
        fast.report(epoch, value)
        assert fast.verdict(epoch) is None
    slow.report(1, 0.0625)
    assert slow.verdict(1) == (
        "pruned after epoch 1: val/acc 0.2812 (the mean of 2 seeds' so far) is clearly worse than other trials' at "
        "that epoch"
    )
    (trial,) = study_of(tmp_path).trials
    assert trial.intermediate_values == {1: 0.28125, 2: 0.625, 3: 0.75}
    assert fast.verdict(4) == slow.verdict(1)  # the fast seed stops at its next epoch


class WriteAfterAnotherSeed(optuna.storages.InMemoryStorage):
    """A study whose next write of an epoch's value lands only after ``meanwhile`` ran: another seed's report and
    its own write of the mean, between this seed's read of the seeds' values and its write."""

    meanwhile = None

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        meanwhile, self.meanwhile = self.meanwhile, None
        if meanwhile:
            meanwhile()
        super().set_trial_intermediate_value(trial_id, step, intermediate_value)


def test_two_seeds_writing_an_epochs_mean_at_once_leave_the_mean_of_both(tmp_path):
    storage = WriteAfterAnotherSeed()
    study = study_with_one_trial(tmp_path, storage)
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), 0)
    first, second = (ReportToStudy(study, storage, trial_id, "val/acc", seed, 2) for seed in (42, 43))
    first.report(1, 0.5)
    storage.meanwhile = lambda: (second.report(1, 0.25), second.verdict(1))
    assert first.verdict(1) is None
    assert study.trials[0].intermediate_values == {1: 0.375}  # not the first seed's 0.5 alone, written last
