"""One run: its config, trainer, checkpoints, history, records and TensorBoard views, and ``train`` that ties them."""
