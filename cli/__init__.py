"""The `vqpix` command line, installed as `keras_vqpix_cli` (never as a bare `cli` module).

Each command lives in its own module and only parses options, then calls `keras_vqpix`.
TensorFlow is imported inside the commands, so `vqpix --help` answers at once.
"""
