"""Post-training: the SLA's ``post_training_steps`` for the trained model (``RunPostTraining``).

Runs on the lifecycle's worker pool and reports back: ``PostTrainingProgress`` for what each
step did, then ``PostTrainingFinished`` or ``PostTrainingFailed``.
"""

import dataclasses
from pathlib import Path

from flops_manager.builds import ProjectBuilder, builds_model_images
from flops_manager.credentials import ProjectCredentials
from flops_manager.lifecycle import events as ev
from flops_manager.lifecycle.reducer import model_uri
from flops_manager.lifecycle.runner import LifecycleRunner
from flops_manager.model_delivery import ServesMlflowModels, TrainedModel
from flops_manager.orchestrators.base import Orchestrator
from flops_manager.records import ModelImageRecord, ProjectRecord
from flops_manager.sla import PostTrainingStep, ProjectSLA
from flops_utils.contract.lifecycle import ProjectStatus
from flops_utils.errors import FlopsError
from flops_utils.logging import logger


class PostTrainingUnsupported(FlopsError):
    """A post-training step this manager cannot run (admission refuses it at POST; seen here
    only for a project accepted by a manager configured otherwise)."""

    code = "post_training_unsupported"


class PostTraining:
    """Builds and deploys the trained-model image as the SLA asks.

    Args:
        runner: where the progress is posted.
        builder: builds the trained-model image (:func:`~flops_manager.builds.
            builds_model_images`).
        orchestrator: serves the model (:meth:`~flops_manager.model_delivery.
            ServesMlflowModels.deploy_model`) or runs its image
            (:meth:`Orchestrator.deploy_inference`).
        workdir: per-project scratch space goes under ``workdir/<project_id>``.
        mlflow_url: tracking server the image's build fetches the model from.
        credentials: the project's MLflow user the build reads the model with.
    """

    def __init__(
        self,
        runner: LifecycleRunner,
        builder: ProjectBuilder,
        orchestrator: Orchestrator,
        workdir: Path,
        mlflow_url: str,
        credentials: ProjectCredentials | None = None,
    ) -> None:
        self.credentials = credentials or ProjectCredentials.none()
        self.runner = runner
        self.builder = builder
        self.orchestrator = orchestrator
        self.workdir = workdir
        self.mlflow_url = mlflow_url

    def run(self, project_id: str) -> None:
        """Run every post-training step of a ``post_training`` project; posts the outcome.
        Never raises."""
        record = self.runner.store.get_project(project_id)
        if record is None or record.status is not ProjectStatus.POST_TRAINING:
            return
        uri = model_uri(record)
        try:
            steps = ProjectSLA.model_validate(record.sla).post_training_steps
        except ValueError:
            steps = []
        image = record.model_image
        for step in steps:
            try:
                image = self._step(record, step, uri, image)
            except Exception as exc:
                if step is PostTrainingStep.DEPLOY_TRAINED_MODEL_IMAGE:
                    self._stop_inference_quietly(project_id)
                message = exc.message if isinstance(exc, FlopsError) else _internal(project_id, exc)
                self.runner.post(project_id, ev.PostTrainingFailed(step.value, message, uri))
                return
        self.runner.post(project_id, ev.PostTrainingFinished())

    def _step(
        self,
        record: ProjectRecord,
        step: PostTrainingStep,
        uri: str,
        image: ModelImageRecord | None,
    ) -> ModelImageRecord | None:
        """Run one step; returns the trained-model image known afterwards.

        ``build_image_for_trained_model`` builds (or reuses) the image (:func:`
        builds_model_images`). ``deploy_trained_model_image`` builds the image first when no
        step did and the builder can, then serves the model: an orchestrator that serves
        MLflow models itself (``local``) gets the model and the image if any
        (:meth:`~flops_manager.model_delivery.ServesMlflowModels.deploy_model`); another one
        runs the image (:meth:`Orchestrator.deploy_inference`). Raises the builder's and the
        orchestrator's ``FlopsError``, and :class:`PostTrainingUnsupported` for a step this
        manager cannot run (admission refuses those at POST).
        """
        project_id = record.project_id
        can_build = builds_model_images(self.builder)
        if step is PostTrainingStep.BUILD_IMAGE_FOR_TRAINED_MODEL and not can_build:
            raise PostTrainingUnsupported(
                "this manager builds no trained-model images: set FLOPS_REGISTRY and "
                "FLOPS_BASE_IMAGE (a registry and a Python 3.11 base image in it)"
            )
        if image is None and can_build:
            image = self._build_image(project_id, uri, record.customer_id)
        if step is not PostTrainingStep.DEPLOY_TRAINED_MODEL_IMAGE:
            return image
        url = self._deploy(record, uri, image)
        self._progress(
            project_id,
            "deployed",
            f"trained-model server at {url} (POST {url}/invocations); DELETE the project to "
            "stop it",
            inference_url=url,
        )
        return image

    def _deploy(self, record: ProjectRecord, uri: str, image: ModelImageRecord | None) -> str:
        """Start the trained-model server; its base URL."""
        project_id = record.project_id
        resources = ProjectSLA.model_validate(record.sla).resource_constraints.model_dump()
        if isinstance(self.orchestrator, ServesMlflowModels):
            tracking = self.credentials.tracking(project_id, record.customer_id)
            model = TrainedModel(uri, self.mlflow_url, tracking, image.ref if image else None)
            return self.orchestrator.deploy_model(project_id, model, resources)
        if image is None or not self.orchestrator.serves_models:
            raise PostTrainingUnsupported(
                f"the '{type(self.orchestrator).__name__}' orchestrator runs no trained-model "
                "server without an image"
            )
        return self.orchestrator.deploy_inference(project_id, image.ref, resources)

    def _build_image(self, project_id: str, uri: str, customer_id: str) -> ModelImageRecord:
        built = self.builder.build_model_image(
            project_id,
            uri,
            self.mlflow_url,
            self.workdir / project_id / "model-build",
            self.credentials.tracking(project_id, customer_id),
        )
        image = ModelImageRecord(**dataclasses.asdict(built))
        how = "reused" if built.reused else f"built in {built.seconds:.1f} s"
        self._progress(
            project_id,
            "built",
            f"trained-model image {built.ref} {how}; it serves {built.model_uri} on port "
            f"{built.port} (POST /invocations)",
            model_image=image.model_dump(mode="json"),
        )
        return image

    def _progress(self, project_id: str, status: str, message: str, **fields: object) -> None:
        self.runner.post(project_id, ev.PostTrainingProgress(status, message, dict(fields)))

    def _stop_inference_quietly(self, project_id: str) -> None:
        """Remove what a failed trained-model deployment left; failures only logged."""
        try:
            self.orchestrator.stop_inference(project_id)
        except Exception:
            logger.exception("project %s: removing the trained-model server failed", project_id)


def _internal(project_id: str, exc: Exception) -> str:
    logger.error("project %s: post-training failed unexpectedly", project_id, exc_info=exc)
    return f"internal error ({type(exc).__name__}); the manager's log has the details"
