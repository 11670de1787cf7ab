"""The README's set-up commands are exactly what CI runs."""
from conftest import REPO


def test_readme_setup_is_what_ci_runs():
    readme = (REPO / 'README.md').read_text()
    setup = readme.split('## Set up', 1)[1].split('```bash', 1)[1].split('```', 1)[0].strip().splitlines()
    ci = [line for line in (REPO / '.ci' / 'run').read_text().splitlines()
          if line.strip() and not line.startswith(('#', 'set ', 'cd '))]
    assert len(setup) == 3 and setup == ci
