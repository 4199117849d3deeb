"""image_builder: turn an ML repository into a runnable environment.

Modules (imported on demand; nothing heavy at package import):

- :mod:`image_builder.repo`: fetch ``ml_repo_url`` (git URL, ``file://``, local path or plain
  directory) at a ref and validate the user contract (DESIGN.md §2).
- :mod:`image_builder.dependencies`: ``conda.yaml`` / ``requirements.txt`` / ``pyproject.toml``
  → pip requirement lines, and their hash.
- :mod:`image_builder.venv_builder`: the ``venv`` builder backend (``VenvBuilder``), used by the
  local orchestrator.
- :mod:`image_builder.errors`: the builder's ``FlopsError`` subclasses.
"""
