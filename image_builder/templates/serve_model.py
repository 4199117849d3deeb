"""Entrypoint of a FLOps model image: serve ``/opt/flops/model`` with MLflow's scoring server.

Copied into the image by :mod:`image_builder.model_image` and run as
``/opt/flops/venv/bin/python /opt/flops/serve_model.py``. It starts the server the way
``mlflow models serve --env-manager local`` and MLflow's own serving containers do
(``mlflow.pyfunc.scoring_server.get_cmd``: uvicorn running ``mlflow.pyfunc.scoring_server.app``
with the model's path in the environment), but in this process when there is one worker, which
saves importing MLflow twice (about 3 s at start on a small machine).

Endpoints (MLflow's scoring protocol): ``GET /ping`` and ``GET /health`` (200 once the model is
loaded), ``GET /version`` (the MLflow version), ``POST /invocations`` (JSON with
``dataframe_split``, ``dataframe_records``, ``instances`` or ``inputs``; CSV; Parquet).

Environment: ``PORT`` (TCP port, 1-65535; the image sets the port it was built with, 8080 by
default), ``MLFLOW_MODELS_WORKERS`` (uvicorn worker processes, default 1),
``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` (seconds per request, MLflow's default 60),
``FLOPS_MODEL_DIR`` (the model, ``/opt/flops/model``). Binds ``0.0.0.0``. A bad value exits
with status 2 and a one-line message.
"""

import os
import sys

HOST = "0.0.0.0"
DEFAULT_PORT = 8080


def _int_env(name: str, default: int, low: int, high: int) -> int:
    """The integer environment variable ``name`` in ``[low, high]``; exits 2 if it is not."""
    raw = os.environ.get(name, "").strip() or str(default)
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        print(f"serve_model: {name}={raw!r} is not an integer in {low}..{high}", file=sys.stderr)
        raise SystemExit(2)
    return value


def main() -> None:
    """Start the scoring server; returns when it stops (SIGTERM or SIGINT)."""
    port = _int_env("PORT", DEFAULT_PORT, 1, 65535)
    workers = _int_env("MLFLOW_MODELS_WORKERS", 1, 1, 64)
    model_dir = os.environ.get("FLOPS_MODEL_DIR") or "/opt/flops/model"

    import uvicorn
    from mlflow.pyfunc import scoring_server

    # command: "uvicorn --host H --port P --workers N mlflow.pyfunc.scoring_server.app:app";
    # environment: the model's path and the request timeout, which the app module reads.
    command, environment = scoring_server.get_cmd(
        model_uri=model_dir,
        port=port,
        host=HOST,  # type: ignore[arg-type]  # MLflow annotates host as int; it is quoted text
        nworkers=workers,
    )
    os.environ.update(environment)
    app = command.split()[-1]
    print(f"serve_model: serving {model_dir} on {HOST}:{port} ({app})", flush=True)
    uvicorn.run(app, host=HOST, port=port, workers=workers)


if __name__ == "__main__":
    main()
