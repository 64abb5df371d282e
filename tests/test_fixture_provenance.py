"""tests/fixtures/README.md records where every fixture comes from: the script that made it lies beside it, and
each file's SHA-256 is the one recorded (a regenerated or replaced fixture shows here)."""

import hashlib
import re

from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures"


def test_every_fixture_and_its_script_are_recorded_with_their_hash():
    recorded = dict(re.findall(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \|$", (FIXTURES / "README.md").read_text(), re.M))
    data = {path.name for path in FIXTURES.iterdir() if path.suffix == ".npz"}
    assert data and data | {"make_fixtures.py", "tv_shim.py"} == set(recorded)
    for name, digest in recorded.items():
        assert hashlib.sha256((FIXTURES / name).read_bytes()).hexdigest() == digest, name
