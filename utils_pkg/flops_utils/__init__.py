"""flops_utils: the contract between FLOps and the ML repositories it trains.

ML repositories import only these modules (see DESIGN.md §2):
``ml_repo_templates``, ``ml_repo_building_blocks``, ``ml_repo_files_proxy``,
``logging`` and ``types``. The other modules (``mqtt_topics``, ``notifications``,
``env_vars``) are shared by the FLOps runtime roles.
"""
