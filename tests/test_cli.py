"""The command line's contract: help lists subcommands, bad input exits 2 with one line."""

import subprocess
import sys


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "sdjax", *args], capture_output=True, text=True, timeout=300
    )


def test_help_lists_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0
    assert "demo" in out.stdout


def test_unknown_flag_is_one_line_error():
    out = run_cli("--no-such-flag")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
