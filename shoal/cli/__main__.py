"""``python -m shoal.cli``: the same command as ``shoal`` and ``python -m shoal``."""
from shoal.cli.main import main

main()
