"""image_builder: turn an ML repository into a runnable environment.

Modules (imported on demand; nothing heavy at package import):

- :mod:`image_builder.repo`: fetch ``ml_repo_url`` (git URL, ``file://``, local path or plain
  directory) at a ref and validate the user contract.
- :mod:`image_builder.dependencies`: ``conda.yaml`` / ``requirements.txt`` / ``pyproject.toml``
  → pip requirement lines, and their hash.
- :mod:`image_builder.python_env`: what both backends install (runtime pins, constraints from
  the manager's environment) and how (uv, its errors, the build lock).
- :mod:`image_builder.venv_builder`: the ``venv`` builder backend (``VenvBuilder``), used by the
  local orchestrator.
- :mod:`image_builder.oci_builder`: the ``oci`` builder backend (``OciBuilder``): learner and
  aggregator OCI images built with buildah from ``templates/``, pushed to a registry, for one
  platform or several (a manifest list per role); the milestones of a build (``BuildStep``).
- :mod:`image_builder.cross_platform`: images for another architecture assembled on this
  machine from its wheels, without running its code (base image facts read from its files, the
  hand-made virtual environment, the cache of those environments, no-wheel errors).
- :mod:`image_builder.buildah`: buildah and skopeo (``Buildah``: build, push and check the
  digest, manifest lists, registry queries, mounting a base image) and their errors condensed.
- :mod:`image_builder.build_context`: what goes into a build context (templates, installer,
  uv and CA bundle, ``LABEL`` values), shared by the image builders.
- :mod:`image_builder.model_image`: trained-model images (``ModelImageBuilder``): an MLflow
  model served by MLflow's scoring server, built with an ``OciBuilder``'s setup.
- :mod:`image_builder.main`: the image builder as a service (``flops-image-builder``),
  reporting over MQTT.
- :mod:`image_builder.confinement`: repository input stays inside the repository (symbolic
  links, ``-r``/``-c`` includes, local packages, ``${VAR}``), checked before any installer runs.
- :mod:`image_builder.build_processes`: every program a build runs, bounded in time, in its own
  process group, and stopped when its build is cancelled (``BuildRegistry``).
- :mod:`image_builder.errors`: the builder's ``FlopsError`` subclasses.
"""
