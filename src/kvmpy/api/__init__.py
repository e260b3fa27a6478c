"""kvmpy's control plane over HTTP: Firecracker's API on a Unix socket, and kvmpy's monitor.

The layers, bottom up, one file each:

- :mod:`.schemas`: Firecracker's request bodies as msgspec Structs (types, required
  fields, unknown fields refused);
- :mod:`.parse`: a validated body becomes an action from :mod:`kvmpy.vmm.actions`;
- :mod:`.render`: results (instance info, a VmConfig) become Firecracker's JSON;
- :mod:`.router`: method and path to a parser, ``submit`` and a response;
- :mod:`.monitor`: kvmpy's own routes under ``/kvmpy/``;
- :mod:`.connection`: one client's HTTP/1.1 conversation (h11), with the size limit;
- :mod:`.server`: :class:`~kvmpy.api.server.ApiServer`, the socket and its threads;
- :mod:`.config_file`: ``--config-file`` with the same validators.

Nothing here touches a Machine: requests become actions and go to ``submit``.
This package imports nothing heavy, so ``from kvmpy.api.server import ApiServer``
can bind the socket before the rest of kvmpy is loaded.
"""
