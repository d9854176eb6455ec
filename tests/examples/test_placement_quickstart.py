"""The README's placement example runs as written and prints what the README shows."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_placement_quickstart_runs_and_vibe_beats_token_balance():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "placement_quickstart.py")], check=True,
                         capture_output=True, text=True, cwd=ROOT, timeout=120).stdout
    makespans = {m[0]: float(m[1]) for m in re.findall(r"^(\w+)\s+sum of layer makespans ([\d.]+) ms", out, re.M)}
    bound = float(re.search(r"lower bound\s+([\d.]+) ms", out).group(1))
    assert bound <= makespans["vibe"] < makespans["eplb"] < makespans["contiguous"]
    before, after, moves = re.search(r"after drift ([\d.]+) ms -> ([\d.]+) ms with (\d+) expert moves", out).groups()
    assert float(after) < float(before) and int(moves) > 0
    readme = (ROOT / "README.md").read_text()
    assert out in readme, "README shows stale output of the example"
    code = (ROOT / "examples" / "placement_quickstart.py").read_text()
    assert code in readme, "README shows other code than examples/placement_quickstart.py"
