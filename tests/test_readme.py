"""CI must run exactly the test command that README.md gives a newcomer."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    out, inside = [], False
    for line in lines:
        if line.strip().startswith("```"):
            inside = not inside
            continue
        if inside and line.strip():
            out.append(line.strip())
    return out


def test_ci_runs_readme_test_command_verbatim():
    commands = _readme_commands()
    test_command = commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci], (
        f".ci/run must run README's test command verbatim: {test_command!r}")


def test_readme_opens_with_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) >= 2
    assert "pip install torch==2.13.0" in commands[0]
    assert "pytest" in commands[1]
