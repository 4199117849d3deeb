"""data_server: one worker node's Arrow Flight data server.

Modules: ``storage`` (Parquet per data tag, atomic writes), ``server`` (the Flight service and
the in-process ``DataServer``), ``main`` (the ``flops-data-server`` CLI), ``registration``
(node registration with the manager), ``mnist`` (the bundled MNIST test split) and
``mock_provider`` (partition a bundled dataset onto nodes). The client side lives in
:mod:`flops_utils.data_client`.
"""
