"""The repository's packaging promises: kernels installed as qstar_jax.kernels, CI runs the
README's test command."""

import pathlib
import re
import tomllib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
  text = (REPO / "README.md").read_text()
  quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```bash\n(.*?)\n```", quickstart, flags=re.S)


def test_readme_quickstart_has_exactly_two_commands():
  commands = _readme_commands()
  assert len(commands) == 2, commands
  assert all("\n" not in c for c in commands), commands


def test_ci_runs_the_readme_test_command():
  test_command = _readme_commands()[1]
  ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
  assert test_command in ci_lines, f"{test_command!r} is not a line of .ci/run"


def test_every_kernel_folder_is_a_listed_package():
  pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
  packages = set(pyproject["tool"]["setuptools"]["packages"])
  folders = {
    "qstar_jax.kernels." + p.parent.name
    for p in (REPO / "kernels").glob("*/__init__.py")
  }
  assert folders, "no kernel subpackages found"
  assert folders <= packages, f"kernel folders missing from pyproject packages: {folders - packages}"
  sub = {p.parent.relative_to(REPO).as_posix().replace("/", ".") for p in (REPO / "qstar_jax").rglob("__init__.py")}
  assert sub <= packages, f"qstar_jax subpackages missing from pyproject packages: {sub - packages}"


def test_kernels_import_as_a_subpackage_only():
  import qstar_jax.kernels

  assert qstar_jax.kernels.__name__ == "qstar_jax.kernels"
  assert pathlib.Path(qstar_jax.kernels.__file__).parent == REPO / "kernels"
