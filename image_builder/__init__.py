"""image_builder: turn an ML repository into a runnable environment.

Modules (imported on demand; nothing heavy at package import):

- :mod:`image_builder.repo`: fetch ``ml_repo_url`` (git URL, ``file://``, local path or plain
  directory) at a ref and validate the user contract (DESIGN.md §2).
- :mod:`image_builder.dependencies`: ``conda.yaml`` / ``requirements.txt`` / ``pyproject.toml``
  → pip requirement lines, and their hash.
- :mod:`image_builder.python_env`: what both backends install (runtime pins, constraints from
  the manager's environment) and how (uv, its errors, the build lock).
- :mod:`image_builder.venv_builder`: the ``venv`` builder backend (``VenvBuilder``), used by the
  local orchestrator.
- :mod:`image_builder.oci_builder`: the ``oci`` builder backend (``OciBuilder``): learner and
  aggregator OCI images built with buildah from ``templates/``, pushed to a registry.
- :mod:`image_builder.errors`: the builder's ``FlopsError`` subclasses.
"""
