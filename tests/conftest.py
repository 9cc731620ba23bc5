"""Test-session environment: CPU-only DeepSpeed, one BLAS thread per process (2-core CI machine)."""

import os

# Entry-point settings (tests are an entry point): child processes inherit them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A local ray.init() under Ray 2.60 turns token auth on and writes ~/.ray/auth_token, which then switches
# every later Ray process of this user to token mode. Tests opt out; the token-auth test sets its own HOME.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
