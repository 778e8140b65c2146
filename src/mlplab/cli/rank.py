"""One rank of a data-parallel run, started by the run's first process (mlplab.compat.RankLauncher) with the run's
own overrides; it trains through the same task function as mlplab-train."""

from mlplab.cli.train import hydra_main
from mlplab.run.distributed import exit_with_parent

if __name__ == "__main__":
    exit_with_parent()
    hydra_main()
