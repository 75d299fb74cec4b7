"""The benchmark scripts run (small shapes), so they cannot rot between GPU runs."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ops_benchmark_quick_run_prints_every_op():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "ops.py"), "--quick"], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    for op in ("rms_norm", "silu_mul", "rope", "rope_cache_write", "attention_decode", "attention_prefill"):
        assert f"\n{op} " in out, f"{op} missing from:\n{out}"
