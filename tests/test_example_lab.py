"""The lab example package's own tests (examples/x2ct-lab-plugins/tests), run from the source tree."""

import sys

from conftest import REPO

LAB = REPO / "examples" / "x2ct-lab-plugins"
for folder in (LAB / "src", LAB / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from test_lab_plugins import *  # noqa: E402, F401, F403
from test_lab_tracker import *  # noqa: E402, F401, F403
