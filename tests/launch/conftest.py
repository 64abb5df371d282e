"""launch/ holds scripts, not a package: its modules are imported by file name, as the scripts do."""

import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "launch"))
