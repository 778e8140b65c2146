"""Ties with the best (mlplab.sweeps.ties): McNemar's and Welch's tests with literal values, and the record each job
keeps of the validation images its best epoch classified correctly (val_correct.npz), alone and stacked."""

import json
import math

import numpy as np
import pytest
from conftest import SYNTHETIC_RUN, run_cli, train_in_process

from mlplab.run.records import read_val_correct
from mlplab.sweeps.ties import compare_with, mcnemar_p, t_two_sided_p, welch_p

# The examples of Wikipedia's "Welch's t-test" article, with the t, degrees of freedom and p it publishes.
A1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
A2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
B1 = [17.2, 20.9, 22.6, 18.1, 21.7, 21.4, 23.5, 24.2, 14.7, 21.8]
B2 = [21.5, 22.8, 21.0, 23.0, 21.6, 23.6, 22.5, 20.7, 23.4, 21.8, 20.7, 21.7, 21.5, 22.5, 23.6, 21.5, 22.5, 23.5]
B2 += [21.5, 21.8]


def t_tail_by_simpson(t: float, df: float, steps: int = 20000) -> float:
    """P[|T| >= |t|] from Student's t density by Simpson's rule over [0, |t|]: no incomplete beta function."""

    def density(x: float) -> float:
        scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        return scale * (1 + x * x / df) ** (-(df + 1) / 2)

    width = abs(t) / steps
    weights = [1 if i in (0, steps) else 4 if i % 2 else 2 for i in range(steps + 1)]
    return 1 - 2 * width / 3 * sum(w * density(i * width) for i, w in enumerate(weights))


def test_mcnemars_exact_test_gives_the_binomial_p_value():
    assert mcnemar_p(10, 0) == 0.001953125  # 2 * 0.5**10
    assert mcnemar_p(0, 10) == 0.001953125
    assert mcnemar_p(3, 5) == 0.7265625  # 2 * (1 + 8 + 28 + 56) / 2**8
    assert mcnemar_p(1, 0) == mcnemar_p(0, 0) == mcnemar_p(4, 4) == 1.0  # at most 1
    assert mcnemar_p(2400, 2550) == pytest.approx(0.03418200701762712, rel=1e-12)  # 4,950 images apart, exactly


def test_welchs_test_gives_the_published_p_values():
    assert welch_p(A1, A2) == pytest.approx(0.021, abs=5e-4)  # published: t = -2.46, df = 25.0, p = 0.021
    assert welch_p(B1, B2) == pytest.approx(0.149, abs=5e-4)  # published: t = -1.57, df = 9.90, p = 0.149
    assert welch_p(A1, A2) == pytest.approx(0.021378001462866, rel=1e-9)  # as scipy's ttest_ind gives it
    assert welch_p(B1, B2) == pytest.approx(0.148841696605328, rel=1e-9)
    assert welch_p([0.9, 0.9], [0.9, 0.9]) == 1.0 and welch_p([0.9, 0.9], [0.8, 0.8]) == 0.0  # no spread


@pytest.mark.parametrize(
    ("t", "df"), [(-2.455356398286006, 24.988529290231416), (-1.5654335235985037, 9.904741248650831), (0.5, 3.7)]
)
def test_the_t_distributions_tail_agrees_with_its_integrated_density(t, df):
    assert t_two_sided_p(t, df) == pytest.approx(t_tail_by_simpson(t, df), abs=1e-9)


def test_the_t_distributions_tail_has_its_closed_forms():
    assert t_two_sided_p(2.0, 1) == pytest.approx(1 - 2 * math.atan(2.0) / math.pi, abs=1e-14)  # Cauchy
    assert t_two_sided_p(2.0, 2) == pytest.approx(1 - 2.0 / math.sqrt(2 + 2.0**2), abs=1e-14)
    assert t_two_sided_p(0.0, 5) == 1.0


def configuration(name: str) -> dict:
    return {"jobs": [{"job": name, "run_dir": name, "val/acc": 0.9}]}


def test_a_comparison_says_no_configuration_is_tied_and_which_cannot_be_paired():
    best = np.arange(100) < 90
    records = {
        "best": (best, np.arange(100) % 10),
        "worse": (np.arange(100) < 80, np.arange(100) % 10),  # b=10, c=0
        "other split": (best, np.arange(100) % 7),
    }
    ties = compare_with([configuration(name) for name in records], read=lambda path: records[str(path)])
    assert [ties.cell(index) for index in range(3)] == ["best", "0.001953 worse", ""]
    assert ties.lines() == [
        "No configuration is tied with the best (p < 0.05, McNemar's exact test on the validation images only one "
        "of the two classified correctly; column `vs best`).",
        "`vs best` is empty for 1 of the 2 other configurations: their jobs were validated on other images (another "
        "`data.split_seed` or `data.val_size`).",
    ]


def test_a_run_records_which_validation_images_its_best_epoch_classified_correctly(synthetic_data_dir, tmp_path):
    train_in_process(synthetic_data_dir, tmp_path, ["optimizer.lr=0.01"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    correct, labels = read_val_correct(tmp_path)
    assert len(correct) == len(labels) == 100  # data.val_size
    assert correct.mean() == pytest.approx(metrics["val/acc"], abs=1e-6)


@pytest.mark.slow
def test_a_stacked_sweep_records_each_jobs_correctness_and_its_share_of_the_stack(synthetic_data_dir, tmp_path):
    args = ["mlplab-train", "-m", *SYNTHETIC_RUN, "model.width=8", "trainer.max_epochs=2", "seed=1,2"]
    result = run_cli([*args, "hydra/launcher=stacked", "hydra.sweep.dir=sweep"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("seed=*"))
    assert [job.name.split(",")[0] for job in jobs] == ["seed=1", "seed=2"]  # the swept key first
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        correct, _ = read_val_correct(job)
        assert metrics["stacked_jobs"] == 2 and correct.mean() == pytest.approx(metrics["val/acc"], abs=1e-6)
    rows = [line for line in (tmp_path / "sweep" / "summary.md").read_text().splitlines() if "| seed=" in line]
    assert len(rows) == 2 and all(" (1/2 of a stack) | " in row for row in rows)
