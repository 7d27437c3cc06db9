from tests.deploy.deploybed import base, everything, kubectl, rendered  # noqa: F401  (fixtures)
