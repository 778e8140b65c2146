"""What a run shows in TensorBoard beyond loss and accuracy curves.

Each view is a callback of its own, listed in ``conf/callbacks/default.yaml`` and switched off there (or with
``callbacks.<name>=null``). They write to the run's TensorBoard logger and do nothing without one.
"""

from mlplab.run.views.network import LearningRate, ModelDescription, WeightHistograms
from mlplab.run.views.predictions import ConfusionMatrix, MisclassifiedImages, PerClassAccuracy

__all__ = ["ConfusionMatrix", "LearningRate", "MisclassifiedImages", "ModelDescription", "PerClassAccuracy",
           "WeightHistograms"]
