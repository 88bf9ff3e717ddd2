"""`vqpix`: train, evaluate, sample and export a VQ-VAE + PixelCNN model of brain MRI slices."""

from __future__ import annotations

import click

from keras_vqpix import __version__

from .anomaly import anomaly
from .classify import classify
from .compare import compare
from .demo_data import demo_data
from .evaluate import evaluate
from .export import export
from .generate import generate
from .prepare import prepare
from .quiet import quiet_tensorflow
from .sample import sample
from .train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vqpix")
def main() -> None:
    """VQ-VAE + Gated PixelCNN generative model of ADNI brain MRI slices.

    Every command runs on the embedded demo data set when no --data is given. TensorFlow's own
    log is hidden; set TF_CPP_MIN_LOG_LEVEL (e.g. to 0) to see it.
    """
    quiet_tensorflow()


for command in (
    demo_data,
    prepare,
    train,
    evaluate,
    sample,
    generate,
    compare,
    classify,
    anomaly,
    export,
):
    main.add_command(command)


if __name__ == "__main__":
    main()
