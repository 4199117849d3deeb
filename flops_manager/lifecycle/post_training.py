"""Post-training: the SLA's ``post_training_steps`` for the trained model (``RunPostTraining``).

Runs on the lifecycle's worker pool and reports back: ``PostTrainingProgress`` for what each
step did, then ``PostTrainingFinished`` or ``PostTrainingFailed``.
"""

import dataclasses
from pathlib import Path

from flops_manager.builds import ProjectBuilder
from flops_manager.credentials import ProjectCredentials
from flops_manager.lifecycle import events as ev
from flops_manager.lifecycle.reducer import model_uri
from flops_manager.lifecycle.runner import LifecycleRunner
from flops_manager.orchestrators.base import Orchestrator
from flops_manager.records import ModelImageRecord, ProjectRecord
from flops_manager.sla import PostTrainingStep, ProjectSLA
from flops_utils.contract.lifecycle import ProjectStatus
from flops_utils.errors import FlopsError
from flops_utils.logging import logger


class PostTraining:
    """Builds and deploys the trained-model image as the SLA asks.

    Args:
        runner: where the progress is posted.
        builder: builds the trained-model image (``oci`` builder only).
        orchestrator: runs it (:meth:`Orchestrator.deploy_inference`).
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

        ``build_image_for_trained_model`` builds (or reuses) the image with the ``oci``
        builder; with the ``venv`` builder it is skipped (an event says so).
        ``deploy_trained_model_image`` builds the image if no step did and runs it through the
        orchestrator; skipped with an event when the orchestrator runs no images. Raises the
        builder's and the orchestrator's ``FlopsError``.
        """
        project_id = record.project_id
        if not self.builder.produces_images:
            self._progress(
                project_id,
                "skipped",
                f"skipped {step.value}: the venv builder makes environments, not images; use "
                "FLOPS_BUILDER=oci (with the oakestra orchestrator) for trained-model images",
            )
            return image
        if image is None:  # deploying needs the image: build it first if no step did
            image = self._build_image(project_id, uri, record.customer_id)
        if step is not PostTrainingStep.DEPLOY_TRAINED_MODEL_IMAGE:
            return image
        if not self.orchestrator.serves_models:
            self._progress(
                project_id,
                "skipped",
                f"skipped {step.value}: the '{type(self.orchestrator).__name__}' orchestrator "
                "does not run images; run the model image (see model_image) yourself",
            )
            return image
        resources = ProjectSLA.model_validate(record.sla).resource_constraints.model_dump()
        url = self.orchestrator.deploy_inference(project_id, image.ref, resources)
        self._progress(
            project_id,
            "deployed",
            f"trained-model server at {url} (POST {url}/invocations); DELETE the project to "
            "stop it",
            inference_url=url,
        )
        return image

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
