"""The README's shell blocks, as a test runs them: in order, in a clean environment.

A block (```bash ... ```) runs unless a marker on the lines right above it says otherwise:

    <!-- readme-test: skip: WHY -->                 the whole block (several machines, a cloud)
    <!-- readme-test: skip-line "COMMAND": WHY -->  each command that starts with COMMAND

so a command that cannot run in a test is skipped by name, with its reason, never silently.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

MARK = "README> "
MARKER = re.compile(r'<!-- readme-test: (skip|skip-line)(?: "([^"]+)")?: (.+?) -->')


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    commands: list[str]  # logical commands (continuation lines joined), comments kept
    skipped: str | None = None  # why the whole block is skipped
    skipped_lines: dict[str, str] = field(default_factory=dict)  # command prefix -> why


def shell_blocks(text: str) -> list[Block]:
    """Every ```bash block of `text` with the markers right above it."""
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        if lines[index].strip() != "```bash":
            index += 1
            continue
        block = Block(line=index + 1, commands=[])
        above = index - 1
        while above >= 0 and (match := MARKER.fullmatch(lines[above].strip())):
            kind, command, why = match.groups()
            if kind == "skip":
                block.skipped = why
            else:
                block.skipped_lines[command] = why
            above -= 1
        index += 1
        logical = ""
        while lines[index].strip() != "```":
            logical += lines[index]
            if logical.endswith("\\"):
                logical += "\n"  # bash reads the backslash-newline as one command
            else:
                block.commands.append(logical)
                logical = ""
            index += 1
        blocks.append(block)
        index += 1
    return blocks


def script(blocks: list[Block]) -> tuple[str, list[str]]:
    """A bash script of the blocks' commands that stops at the first failing one (named in
    the output), and what was skipped: "block: WHY" or "COMMAND: WHY", each once. Each
    command is announced by a MARK line, so `outputs` can tell whose output is whose."""
    body = ["set -eo pipefail", "exec 2>&1", "trap 'echo \"README command failed: $BASH_COMMAND\"' ERR"]
    skipped = []
    for block in blocks:
        if block.skipped:
            skipped.append(f"block: {block.skipped}")
            continue
        for command in block.commands:
            name = next((prefix for prefix in block.skipped_lines if command.strip().startswith(prefix)), None)
            if name is not None:
                skipped.append(f"{name}: {block.skipped_lines[name]}")
                continue
            body += [f"echo {shlex.quote(MARK + command.splitlines()[0])}", command]
    return "\n".join(body) + "\n", skipped


def outputs(text: str) -> list[tuple[str, str]]:
    """(first line of the command, its output: stdout and stderr) for each command run."""
    found: list[tuple[str, str]] = []
    for line in text.splitlines(keepends=True):
        if line.startswith(MARK):
            found.append((line[len(MARK):].rstrip("\n"), ""))
        elif found:
            found[-1] = (found[-1][0], found[-1][1] + line)
    return found


def run_blocks(blocks: list[Block], cwd: Path, home: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the blocks in one bash, in `cwd`, with nothing of the caller's environment but
    PATH=/usr/bin:/bin and HOME (a new user's shell, no venv activated); stderr goes to
    stdout, in order."""
    text, _ = script(blocks)
    return subprocess.run(["/bin/bash", "-c", text], cwd=cwd, env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
                          capture_output=True, text=True, timeout=timeout)
