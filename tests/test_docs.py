"""The docs stay true to the code: every setting documented, every relative link and cited
document present. Plain file reads, no database."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ROOT / "agentsvc" / "settings.py"
CONFIGURATION = ROOT / "docs" / "configuration.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# env_str("NAME", ...), env_int(\n    "NAME", ...): every variable settings.py reads through the
# agentsvc.env helpers; and the providers' keys, read at call time ("api_key_env": "NAME").
_ENV_READ = re.compile(r'\benv_[a-z_]+\(\s*"([A-Z][A-Z0-9_]*)"')
_KEY_ENV = re.compile(r'"api_key_env":\s*"([A-Z][A-Z0-9_]*)"')
# [text](target) and ![alt](target); a target ends at whitespace or ")".
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# A document a code comment cites: FOO.md or some/path/foo.md.
_CITED_DOC = re.compile(r"(?<![\w.-])((?:[\w.-]+/)*[\w-]+\.md)\b")


def settings_variables(text: str) -> list[str]:
    return sorted(set(_ENV_READ.findall(text)) | set(_KEY_ENV.findall(text)))


def documented_variables(text: str) -> set[str]:
    """The variables with a row of their own in the configuration table."""
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", text, flags=re.MULTILINE))


def test_settings_parse_finds_the_variables():
    found = settings_variables(SETTINGS.read_text())
    # A regex that stopped matching would make the next test pass on nothing.
    assert len(found) > 50
    assert {"DATABASE_URL", "EXECUTOR_DB_THREADS", "OPENAI_API_KEY"} <= set(found)


def test_every_setting_is_in_the_configuration_table():
    missing = [
        name
        for name in settings_variables(SETTINGS.read_text())
        if name not in documented_variables(CONFIGURATION.read_text())
    ]
    assert not missing, f"add a row to docs/configuration.md for: {', '.join(missing)}"


def test_a_missing_variable_is_caught():
    text = 'X = env_int("SOME_NEW_SETTING", 1)\nY = env_str(\n    "OTHER_ONE", "")\n'
    assert settings_variables(text) == ["OTHER_ONE", "SOME_NEW_SETTING"]
    assert "SOME_NEW_SETTING" not in documented_variables(CONFIGURATION.read_text())


def relative_links(path: Path) -> list[str]:
    text = path.read_text()
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)  # code blocks
    targets = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, https:, mailto:, or an anchor in the same file
        targets.append(target.split("#", 1)[0])
    return targets


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files(doc):
    broken = [t for t in relative_links(doc) if not (doc.parent / t).exists()]
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


def test_readme_links_into_docs():
    links = set(relative_links(ROOT / "README.md"))
    for name in (
        "api.md",
        "getting-started.md",
        "chains.md",
        "streaming.md",
        "webhooks.md",
        "configuration.md",
        "operations.md",
        "reliability.md",
        "security.md",
        "benchmarks.md",
    ):
        assert f"docs/{name}" in links, name


def test_code_cites_only_documents_of_this_repository():
    try:
        tracked = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    documents = {Path(f).name for f in tracked if f.endswith(".md")}
    documents |= {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    here = Path(__file__).name
    unknown = []
    for f in tracked:
        if not f.endswith((".py", ".json", ".yml", ".yaml", ".toml", ".service", ".example")):
            continue
        if Path(f).name == here:
            continue
        text = (ROOT / f).read_text(errors="replace")
        for cited in _CITED_DOC.findall(text):
            if Path(cited).name not in documents:
                unknown.append(f"{f}: {cited}")
    assert not unknown, f"citations of documents that are not in the repository: {unknown}"
