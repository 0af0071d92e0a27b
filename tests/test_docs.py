"""The README and docs/: every relative link and #anchor resolves, the README stays short, every
page is in mkdocs.yml's nav, and the pages write commands in their `jattn <command>` form.

Anchors are the ids that MkDocs gives headings: Python-Markdown's toc extension, transcribed here
(`slugify`, `unique`), or an explicit `{#id}` (attr_list) or HTML `id="..."`. The transcription is
checked against slugs worked out by hand and, where Python-Markdown is installed (the `docs`
extra), against the ids it renders.
"""

from __future__ import annotations

import glob
import os
import re
import unicodedata

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
ATTR_ID = re.compile(r"\s*\{[^}]*#([\w-]+)[^}]*\}\s*$")
HTML_ID = re.compile(r"""<[^>]*\bid=["']([^"']+)["']""")
# [text](target) and ![alt](target), target up to a space (a title may follow) or ')'.
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*)?\)")
CODE_SPAN = re.compile(r"(`+).+?\1")


def pages() -> list[str]:
  return sorted(glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True))


def documents() -> list[str]:
  return [os.path.join(REPO, "README.md"), *pages()]


def prose_lines(text: str):
  """(line number, line) outside fenced code blocks."""
  fenced = False
  for number, line in enumerate(text.splitlines(), 1):
    if FENCE.match(line):
      fenced = not fenced
      continue
    if not fenced:
      yield number, line


def slugify(heading: str) -> str:
  """Python-Markdown's toc slug of a heading's text: inline markup dropped (code spans keep their
  text, links their text), accents folded to ASCII, what is neither a word character, a space nor
  a hyphen removed, lower case, runs of spaces and hyphens one hyphen."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
  text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
  text = text.replace("`", "")
  text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
  text = re.sub(r"[^\w\s-]", "", text).strip().lower()
  return re.sub(r"[-\s]+", "-", text)


def unique(slug: str, used: set[str]) -> str:
  """toc's unique(): a repeated id gets _1, _2, ..."""
  candidate, n = slug, 0
  while candidate in used:
    n += 1
    candidate = f"{slug}_{n}"
  used.add(candidate)
  return candidate


def anchors(path: str) -> set[str]:
  """The ids a Markdown file's headings (and explicit ids) get."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  used: set[str] = set()
  found: set[str] = set()
  for _, line in prose_lines(text):
    found.update(HTML_ID.findall(line))
    match = HEADING.match(line)
    if not match:
      continue
    title = match.group(2)
    explicit = ATTR_ID.search(title)
    if explicit:
      used.add(explicit.group(1))
      found.add(explicit.group(1))
    else:
      found.add(unique(slugify(title), used))
  return found


def links(path: str):
  """(line number, target) of every link in a Markdown file's prose (not in code)."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  for number, line in prose_lines(text):
    for target in LINK.findall(CODE_SPAN.sub("", line)):
      yield number, target


def broken_links(paths: list[str]) -> list[str]:
  """'FILE:LINE: TARGET (why)' for every relative link or #anchor that does not resolve."""
  problems = []
  cache: dict[str, set[str]] = {}
  for path in paths:
    for number, target in links(path):
      if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
        continue
      file_part, _, anchor = target.partition("#")
      where = f"{os.path.relpath(path, REPO)}:{number}: {target}"
      resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) \
          if file_part else path
      if not os.path.exists(resolved):
        problems.append(f"{where} (no such file)")
        continue
      if anchor:
        if not resolved.endswith(".md") or os.path.isdir(resolved):
          problems.append(f"{where} (an anchor into a file that is not Markdown)")
          continue
        if resolved not in cache:
          cache[resolved] = anchors(resolved)
        if anchor not in cache[resolved]:
          problems.append(f"{where} (no heading with that anchor)")
  return problems


def test_every_relative_link_and_anchor_resolves():
  assert len(pages()) >= 10  # the docs are there to check
  assert broken_links(documents()) == []


def test_the_checker_finds_broken_files_and_anchors(tmp_path):
  (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading: with, punctuation\n")
  (tmp_path / "page.md").write_text(
      "# Page\n\n## Twice\n\n## Twice\n\n## Custom {#mine}\n\n<a id=\"html-anchor\"></a>\n\n"
      "[good](other.md) [good anchor](other.md#a-code-heading-with-punctuation)\n"
      "[second twice](#twice_1) [explicit](#mine) [html](#html-anchor) [web](https://x.org/#y)\n"
      "[missing file](nothere.md) [missing anchor](other.md#a-code-heading)\n"
      "`[in code](nothere2.md)`\n\n```\n[fenced](nothere3.md)\n```\n"
      "[third twice](#twice_2)\n")
  found = broken_links([str(tmp_path / "page.md")])
  assert [line.split(": ", 1)[1] for line in found] == [
      "nothere.md (no such file)",
      "other.md#a-code-heading (no heading with that anchor)",
      "#twice_2 (no heading with that anchor)",
  ]


def test_a_broken_link_in_the_readme_is_found(tmp_path):
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  assert "(docs/sweeps.md#paired-comparisons)" in readme
  broken = tmp_path / "README.md"
  broken.write_text(readme.replace("(docs/sweeps.md#paired-comparisons)",
                                   "(docs/sweeps.md#paired-comparison)"))
  os.symlink(DOCS, tmp_path / "docs")
  assert [p.split(": ", 1)[1] for p in broken_links([str(broken)])] == [
      "docs/sweeps.md#paired-comparison (no heading with that anchor)"]


@pytest.mark.parametrize("heading, slug", [
    ("`results.json` (schema `jattn.results/2`)", "resultsjson-schema-jattnresults2"),
    ("CPU: the paper's model beside PyTorch", "cpu-the-papers-model-beside-pytorch"),
    ("Sweeps, seeds and paired comparisons", "sweeps-seeds-and-paired-comparisons"),
    ("Your own patches: a folder, a manifest, or a TFDS data set",
     "your-own-patches-a-folder-a-manifest-or-a-tfds-data-set"),
    ("ResNet-18 and ResNet-50", "resnet-18-and-resnet-50"),
    ("A - B  and [a link](x.md)", "a-b-and-a-link"),
    ("Überblick **fett**", "uberblick-fett"),
])
def test_slugs_worked_out_by_hand(heading, slug):
  assert slugify(heading) == slug


def test_slugs_match_python_markdown():
  markdown = pytest.importorskip("markdown")
  for path in documents():
    with open(path, encoding="utf-8") as f:
      html = markdown.markdown(f.read(), extensions=["toc", "attr_list", "tables", "fenced_code"])
    rendered = set(re.findall(r'<h[1-6] id="([^"]+)"', html))
    ours = anchors(path)
    assert rendered <= ours, (path, sorted(rendered - ours))


def test_readme_is_at_most_250_lines():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    assert len(f.read().splitlines()) <= 250


def nav_pages(nav) -> list[str]:
  if isinstance(nav, str):
    return [nav]
  if isinstance(nav, list):
    return [page for item in nav for page in nav_pages(item)]
  if isinstance(nav, dict):
    return [page for value in nav.values() for page in nav_pages(value)]
  return []


def test_every_page_is_in_the_nav():
  with open(os.path.join(REPO, "mkdocs.yml"), encoding="utf-8") as f:
    config = yaml.safe_load(f)
  assert config["docs_dir"] == "docs"
  assert config["theme"]["name"] == "material"
  listed = nav_pages(config["nav"])
  on_disk = sorted(os.path.relpath(p, DOCS) for p in pages())
  assert sorted(listed) == on_disk
  assert len(listed) == len(set(listed))


def test_pages_write_commands_as_jattn_commands():
  old_form = re.compile(r"python -m jattn\.(?!main\b)\w+|experiments/sweep\.py")
  issue = re.compile(r"\bissues? \d+", re.I)
  for path in documents():
    with open(path, encoding="utf-8") as f:
      text = f.read()
    where = os.path.relpath(path, REPO)
    assert old_form.findall(text) == [], where
    assert issue.findall(text) == [], where
