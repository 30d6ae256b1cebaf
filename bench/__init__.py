"""Benchmarks of the gateway against OpenSSH's sshd on the same machine (issue 8).

Run `.venv/bin/python bench/run.py` (or `--quick` for a smoke run); see docs/benchmarks.md.
"""
