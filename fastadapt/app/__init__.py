"""The application (layer 7): the ``fastadapt`` command line, training, evaluation, the main job,
the embedded model, prompts and data. It uses the library through its public API only."""
