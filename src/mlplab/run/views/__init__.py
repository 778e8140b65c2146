"""What a run shows in TensorBoard beyond loss and accuracy curves.

Each view is a callback of its own, listed in ``conf/callbacks/default.yaml`` by its class path and switched off
there (or with ``callbacks.<name>=null``). They write to the run's TensorBoard logger and do nothing without one;
the images and the architecture also go to W&B (and the images to MLflow without TensorBoard).
"""
