"""The README and docs/*.md: every relative link and image resolves, and the README stays short."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_targets(text):
  """The link and image targets of a markdown text that name a local file (code spans left out)."""
  text = INLINE_CODE.sub("", FENCE.sub("", text))
  for target in LINK.findall(text):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
      continue  # a URL (http:, mailto:) or an anchor in the same page
    yield target.split("#", 1)[0]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
  missing = [
      t
      for t in relative_targets(page.read_text(encoding="utf-8"))
      if not (page.parent / t).exists()
  ]
  assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_link_parser_sees_links_and_images_but_not_code():
  text = "[a](docs/x.md) ![b](y.png#frag) [c](https://e.org) `[d](no.md)`\n```\n[e](no2.md)\n```\n"
  assert list(relative_targets(text)) == ["docs/x.md", "y.png"]


def test_readme_is_short_and_starts_with_the_two_commands():
  text = (ROOT / "README.md").read_text(encoding="utf-8")
  assert len(text.splitlines()) <= 210, "README.md is a summary: move detail to docs/"
  first_block = re.search(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
  assert first_block, "README.md has no code block"
  commands = [
      l for l in first_block.group(1).splitlines() if l.strip() and not l.lstrip().startswith("#")
  ]
  assert commands and commands[0].startswith("python3 -m venv .venv"), commands[:1]
  assert "pip install -r requirements-dev.txt" in commands[0]
  assert (
      "python -m pytest -q" in commands
  ), "the test command belongs in the README's first code block"
