"""A callback for the start-up benchmark: writes the time of the first optimizer step, then ends the process."""

import os
import time
from pathlib import Path

from lightning.pytorch import Callback


class FirstStepProbe(Callback):
    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.path.write_text(repr(time.time()))
        os._exit(0)  # the start-up is measured; the rest of the run is not needed
