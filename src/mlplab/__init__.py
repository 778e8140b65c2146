"""mlplab: configurable MLP experiments with Lightning, Hydra and TensorBoard."""
