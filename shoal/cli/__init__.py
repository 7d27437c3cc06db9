"""The ``shoal`` command (``main``) and its groups: ``observe``, ``deploy`` (install on
Kubernetes), ``waypoint``. It is the only place besides ``shoal.local`` that assembles processes."""
