"""eBPF C sources, one file per attach point; shared headers in lib/."""
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
