"""Moved to `keras_vqpix.run_folder`; this alias keeps imports of release 0.1.0 working.

Import from `keras_vqpix.run_folder` in new code: this module will be removed.
"""

from keras_vqpix.run_folder import (  # noqa: F401
    LOCK_NAME,
    RESUMABLE_FIELDS,
    RunFolderError,
    RunPaths,
    check_run_folder,
    config_differences,
    fingerprint_number,
    load_prior,
    load_vqvae,
    prepare_run_folder,
    read_config,
    read_json,
    run_folder_lock,
    save_model,
    weights_fingerprint,
    write_json,
)
