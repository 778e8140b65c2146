"""mlplab's Hydra sweeper plugin; Hydra finds it in the hydra_plugins namespace."""
