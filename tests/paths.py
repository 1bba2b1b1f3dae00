"""Where the repository is, for tests that run its launchers, configs and scripts."""
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1])
