"""Training: `train_run` trains the VQ-VAE stage, the prior stage, or both, in a run folder.

This package only trains; the run folder itself (paths, JSON, loading the saved models, the
recorded split) is `keras_vqpix.run_folder`. Names below are re-exported from their modules.
"""

from keras_vqpix.run_folder import load_splits, split_record
from keras_vqpix.training.distribute import DistributedRunError
from keras_vqpix.training.run import STAGES, TrainResult, report_skipped, train_run

__all__ = [
    "STAGES",
    "DistributedRunError",
    "TrainResult",
    "load_splits",
    "report_skipped",
    "split_record",
    "train_run",
]
