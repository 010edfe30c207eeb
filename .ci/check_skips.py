"""Fail when a test skipped for a reason .ci/allowed-skips.txt does not list.

    python .ci/check_skips.py SKIP_LOG   (the file tests/conftest.py fills under TAPESTRY_SKIP_LOG)
"""

import json
import re
import sys
from pathlib import Path

allowed = [re.compile(line, re.IGNORECASE) for line in
           (Path(__file__).parent / "allowed-skips.txt").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
log = Path(sys.argv[1])
skips = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
bad = [s for s in skips if not any(p.search(s["reason"]) for p in allowed)]
for s in bad:
    print(f"skipped without an allowed reason: {s['test']}: {s['reason']}", file=sys.stderr)
print(f"{len(skips)} skip(s), {len(skips) - len(bad)} allowed", file=sys.stderr)
sys.exit(1 if bad else 0)
