"""Each (seed, epoch) has its own batch order, in single runs, stacks and data-parallel ranks alike; a run started
when orders came from seed + epoch resumes with those orders, bit for bit."""

import torch
from conftest import train_in_process

from mlplab.data.batches import SEED_AND_EPOCH, SEED_PLUS_EPOCH, InMemoryBatches, ShardSampler, StackedBatches
from mlplab.data.datamodule import ImageDataModule
from mlplab.data.datasets import Split

# A split of 8 samples has 40,320 orders, so 40 drawn at random all differ (a 6-sample split's 720 would share one
# by chance about two times in three).
SAMPLES = 8
ORDERS = {  # (seed, epoch counted from 0): the order of that epoch
    (1, 0): [4, 5, 6, 2, 1, 0, 3, 7],
    (1, 1): [3, 5, 0, 7, 2, 4, 1, 6],
    (2, 0): [7, 4, 0, 2, 1, 6, 3, 5],
    (8, 4): [1, 0, 4, 6, 7, 5, 3, 2],
}


def order(seed: int, epoch: int, orders: str = SEED_AND_EPOCH) -> list[int]:
    sampler = ShardSampler(SAMPLES, shuffle=True, seed=seed, orders=orders)
    sampler.set_epoch(epoch)
    return sampler.order().tolist()


def test_seeds_1_to_8_over_5_epochs_share_no_order():
    orders = {(seed, epoch): order(seed, epoch) for seed in range(1, 9) for epoch in range(5)}
    assert {key: orders[key] for key in ORDERS} == ORDERS
    assert len({tuple(drawn) for drawn in orders.values()}) == 40
    # Drawn from seed + epoch, seed 2's first epoch was seed 1's second, and 8 seeds over 5 epochs had 12 orders.
    assert order(2, 0, SEED_PLUS_EPOCH) == order(1, 1, SEED_PLUS_EPOCH) == [0, 4, 7, 2, 6, 5, 1, 3]
    assert len({tuple(order(seed, epoch, SEED_PLUS_EPOCH)) for seed in range(1, 9) for epoch in range(5)}) == 12


def test_a_stack_and_a_data_parallel_runs_ranks_serve_each_seeds_own_order():
    split = Split(torch.zeros(SAMPLES, 1, 1, 1, dtype=torch.uint8), torch.arange(SAMPLES))  # label = position
    stack = StackedBatches(split, SAMPLES, seeds=[1, 2])  # one batch an epoch: K x 8 labels
    ((_, labels),) = list(stack)
    assert labels.tolist() == [ORDERS[1, 0], ORDERS[2, 0]]
    ranks = [InMemoryBatches(split, 2, ShardSampler(SAMPLES, True, 1, rank, world_size=2)) for rank in range(2)]
    for batches in ranks:
        batches.sampler.set_epoch(1)
    # Every rank draws seed 1's second order; steps of 2 x 2 samples deal its samples out in turn.
    assert [batches.positions().tolist() for batches in ranks] == [ORDERS[1, 1][0::2], ORDERS[1, 1][1::2]]


class EarlierVersionData(ImageDataModule):
    """The data module of a version before batch orders were recorded: seed + epoch, and no record of it."""

    def __init__(self, settings, data_dir, shuffle_seed=0, batch_orders=SEED_AND_EPOCH):
        super().__init__(settings, data_dir, shuffle_seed, SEED_PLUS_EPOCH)
        del self.hparams["batch_orders"]


def test_a_run_started_with_seed_plus_epoch_orders_resumes_with_them_bit_for_bit(
    synthetic_data_dir, tmp_path, monkeypatch
):
    overrides = ["trainer.deterministic=true", "seed=3"]
    with monkeypatch.context() as earlier:
        earlier.setattr("mlplab.run.train.ImageDataModule", EarlierVersionData)
        straight = train_in_process(synthetic_data_dir, tmp_path / "straight", overrides)
        stopped = train_in_process(synthetic_data_dir, tmp_path / "resumed", overrides, stop_after=1)
    assert "batch_orders" not in stopped["datamodule_hyper_parameters"]  # as an earlier version wrote it
    resumed = train_in_process(
        synthetic_data_dir, tmp_path / "resumed", overrides, resume_from=tmp_path / "resumed/checkpoints/last.ckpt"
    )
    assert resumed["global_step"] == straight["global_step"] == 30  # 3 epochs of 10 batches
    weights = straight["state_dict"]
    assert all(torch.equal(weights[key], resumed["state_dict"][key]) for key in weights)
    assert resumed["datamodule_hyper_parameters"]["batch_orders"] == SEED_PLUS_EPOCH  # and says so from now on
    # A run started now draws other orders, and they change its weights: the equality above is the old orders'.
    new = train_in_process(synthetic_data_dir, tmp_path / "new", overrides)
    assert new["datamodule_hyper_parameters"]["batch_orders"] == SEED_AND_EPOCH
    assert not torch.equal(new["state_dict"]["network.1.weight"], weights["network.1.weight"])
