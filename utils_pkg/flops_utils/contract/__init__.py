"""The contract between the manager and the processes it runs (learner, aggregator, image
builder, data server): one definition of each name, payload and code, imported by every role.

Nothing in this package imports ``flops_manager``: the runtime images carry ``flops_utils``
only. Modules: :mod:`.lifecycle` (project and component statuses, progress stages),
:mod:`.services` (service naming), :mod:`.topics` (MQTT topics), :mod:`.messages` (the
versioned status message payloads), :mod:`.training` (the training configuration and the
strategies the aggregator runs), :mod:`.tracking` (the registered model's name and the
provenance of a project's MLflow record), :mod:`.exit_codes` (the exit-code catalogue) and
:mod:`.entry` (the entry wrapper of every role's ``main``).
"""
