"""Shoal: a sidecarless, per-node eBPF service mesh for Kubernetes.

One namespace, several folders (setup.py's package-dir mapping): ``shoal.agent.X`` is
``agent/X.py``, ``shoal.agent.ztunnel.X`` is ``agent/ztunnel/X.py``, ``shoal.controller.X``
is ``controller/X.py``, ``shoal.waypoint.X`` is ``waypoint/X.py``, ``shoal.perf.X`` is
``perf/X.py``, ``shoal.bpf`` is ``bpf/``. Every other ``shoal.X`` lives here, in
``shoal/X.py`` or ``shoal/X/``:

- shared libraries, which two processes agree on and which import no daemon (``config``,
  ``runtime``, ``xds``, ``zds``, ``hbone``, ``flows``, ``policy``, ``datapath``... the
  README's layout table lists them all);
- the assemblers, the only code that puts processes together: ``cli`` (the ``shoal``
  command) and ``local`` (the development cluster; only the CLI imports it).

The daemons (agent, node proxy, controller, waypoint) import only the shared libraries,
never each other; tests/test_checks.py checks every rule (contracts in pyproject.toml).
"""

__version__ = "0.1.0"
