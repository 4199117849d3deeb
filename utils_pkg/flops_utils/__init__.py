"""flops_utils: the contract between FLOps and the ML repositories it trains.

ML repositories import only these modules: ``ml_repo_templates``, ``ml_repo_building_blocks``,
``ml_repo_files_proxy``, ``logging`` and ``types``. The other modules are shared by the FLOps
runtime roles; :mod:`flops_utils.contract` holds what the manager and the roles agree on
(statuses, service names, MQTT topics and payloads, the training configuration, exit codes
and the roles' entry wrapper).
"""
