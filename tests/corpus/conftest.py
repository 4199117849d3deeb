"""The corpus subdirectories (``sklearn_mlflow2024/``, ``pytorch_mnist/``, ``keras_tf212/``) are ML
repositories, not tests: they are never collected, and their modules are only imported by
the worker process that runs inside each repository's own virtualenv
(``test_corpus_models.py``)."""

collect_ignore = ["sklearn_mlflow2024", "pytorch_mnist", "keras_tf212"]
