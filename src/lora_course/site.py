"""``make site``: the executed course as a static website in ``build/site/``, from the notebooks ``make course`` ran.

``make course`` (and ``make test``) execute every notebook with papermill into ``build/`` (outputs kept) and write
``build/course-report.json``; this module turns those into HTML pages, offline, with nothing to download:

- ``index.html``: the course map. Each chapter's title, learning objectives, status and wall time, its key measured
  figures (the same one-liners as README's course-map table, ``readme.LANE_METRICS``) with every recorded metric
  one click away, and the machine (CPU, cores, CPU flags, library versions) and date they were measured on.
- ``NN_topic.html`` per notebook: the executed notebook with its outputs and figures (inlined as base64), its
  Colab/Kaggle links and a link to its source in the repository (``paths``), and navigation (course map, previous,
  next, every chapter) at the top and bottom. The setup cell and the solutions are collapsed whole (``<details>``);
  a cell whose source is hidden in JupyterLab (``metadata.jupyter.source_hidden``: the closing check) has its
  source collapsed and its output shown.

The tool is nbconvert (pinned in the dev extra), through its HTML exporter with the course's template (``TEMPLATE``)
on top of its JupyterLab template. Why: it is Jupyter's own converter, already in the stack (papermill and JupyterLab
stand on it), it renders every output the course produces as JupyterLab shows it (ANSI streams, HTML tables, PNG and
SVG figures), and it runs from Python, offline. Jupyter Book 2 / mystmd would bring cross-references and search,
but it needs Node.js and a set of npm packages on every machine that builds the site, for features the course
does not use yet.

nbconvert's default templates load require.js, MathJax and mermaid (and the widget manager when a notebook holds
widget state) from CDNs, which fails offline with console errors. The course's template drops them all: math in
markdown is converted to MathML at build time (``latex2mathml``, pinned), which browsers render natively; tqdm's
progress-bar widgets become static HTML from the widget state papermill saved; the badge images (hosted by Colab
and Kaggle) become text links. ``external_loads`` lists whatever a page would still fetch from elsewhere, and the
build refuses such a page. ``scripts/site_check.py`` then opens every page in headless Chromium (``make site-check``).

    python -m lora_course.site [--build build] [--out build/site]
"""
from __future__ import annotations

import argparse
import copy
import functools
import html
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .notebook import NAME_RE, badges_markdown
from .paths import REPO_BRANCH, REPO_URL, colab_url, kaggle_url, write_text_atomic

REPORT = "course-report.json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
IMAGE_MIMES = ("image/png", "image/jpeg", "image/svg+xml", "image/gif")


@dataclass
class Chapter:
    """One executed notebook of the course, as the site shows it."""

    notebook: str  # e.g. 04_qlora.ipynb
    title: str
    objectives: list[str]
    status: str  # ok / FAILED / SKIPPED, from the course report
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    figures: int = 0  # image outputs in the executed notebook

    @property
    def stem(self) -> str:
        return self.notebook.removesuffix(".ipynb")

    @property
    def page(self) -> str:
        return f"{self.stem}.html"


def image_outputs(nb: dict[str, Any]) -> int:
    """How many outputs of ``nb`` are images (a figure, a plot): what its page must show."""
    return sum(any(m in out.get("data", {}) for m in IMAGE_MIMES)
               for cell in nb.get("cells", []) for out in cell.get("outputs", []))


def _src(cell: dict[str, Any]) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def title_and_objectives(nb: dict[str, Any]) -> tuple[str, list[str]]:
    """The title (first ``# `` line) and the learning-objective bullets (markdown) of a notebook's first cell."""
    first = _src(nb["cells"][0]) if nb.get("cells") else ""
    title = next((ln[2:].strip() for ln in first.splitlines() if ln.startswith("# ")), "")
    objectives: list[str] = []
    in_list = False
    for line in first.splitlines():
        if "learning objectives" in line.lower():
            in_list = True
        elif in_list and line.startswith("- "):
            objectives.append(line[2:].strip())
        elif in_list and objectives and line.startswith("  ") and line.strip():
            objectives[-1] += " " + line.strip()
        elif in_list and objectives and not line.strip():
            break
    return title, objectives


def find_chapters(build: Path) -> tuple[list[Chapter], dict[str, Any]]:
    """The chapters of an executed course in ``build`` (the report's notebooks, in order) and the report itself."""
    build = Path(build)
    report_path = build / REPORT
    hint = ("run `make course` (or `make test`) first: it executes every notebook with papermill into build/ and "
            "writes build/course-report.json")
    if not build.is_dir():
        raise FileNotFoundError(f"no build folder {build}: {hint}")
    if not report_path.is_file():
        raise FileNotFoundError(f"no {report_path}: {hint}")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    rows = sorted(report.get("notebooks", []), key=lambda r: r["notebook"])
    if not rows:
        raise ValueError(f"{report_path} lists no notebook: {hint}")
    chapters = []
    for row in rows:
        path = build / row["notebook"]
        if not path.is_file():
            raise FileNotFoundError(f"{report_path} lists {row['notebook']} ({row.get('status', '?')}: "
                                    f"{row.get('error', '')}) but {path} is missing: {hint}")
        nb = json.loads(path.read_text(encoding="utf-8"))
        title, objectives = title_and_objectives(nb)
        chapters.append(Chapter(row["notebook"], title or row["notebook"], objectives, row.get("status", "?"),
                                float(row.get("seconds", 0.0)), row.get("metrics", {}), row.get("error", ""),
                                image_outputs(nb)))
    return chapters, report


# ------------------------------------------------------------------------------------ notebook preparation
def _widget_html(state: dict[str, Any], model_id: str) -> str | None:
    """A tqdm progress bar (an HBox of HTML, FloatProgress, HTML) as static HTML, from the saved widget state."""
    from bs4 import BeautifulSoup

    model = state.get(model_id)
    if not model:
        return None
    parts = []
    for child in model.get("state", {}).get("children", []):
        sub = state.get(str(child).removeprefix("IPY_MODEL_"), {})
        s, name = sub.get("state", {}), sub.get("model_name", "")
        if name == "FloatProgressModel" or name == "IntProgressModel":
            parts.append(f'<progress value="{s.get("value", 0)}" max="{s.get("max", 1) or 1}"></progress>')
        elif "value" in s:
            text = BeautifulSoup(str(s["value"]), "html.parser").get_text().replace("\u2007", " ")
            parts.append(f"<span>{html.escape(text)}</span>")
    return f'<div class="course-progress">{" ".join(parts)}</div>' if parts else None


def prepare(nb: dict[str, Any], chapter: Chapter) -> dict[str, Any]:
    """A copy of an executed notebook ready for the template: widgets made static (their state dropped), the badge
    images (fetched from Colab and Kaggle) taken out of the title cell (the page shows them as links), a title."""
    nb = copy.deepcopy(nb)
    state = nb.get("metadata", {}).pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for cell in nb.get("cells", []):
        outputs = []
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW in data:
                static = _widget_html(state, data[WIDGET_VIEW].get("model_id", ""))
                if static is None:
                    continue  # a widget whose state was not saved shows nothing in a static page
                out["data"] = {"text/html": static}
            outputs.append(out)
        if cell.get("cell_type") == "code":
            cell["outputs"] = outputs
    if nb.get("cells") and nb["cells"][0].get("cell_type") == "markdown":
        first = _src(nb["cells"][0]).replace(badges_markdown(chapter.notebook), "")
        nb["cells"][0]["source"] = re.sub(r"\[!\[[^\]]*\]\([^)]*\)\]\([^)]*\)", "", first)  # any other badge
    nb.setdefault("metadata", {})["title"] = f"{chapter.title} · lora-course"
    return nb


# ------------------------------------------------------------------------------------------- rendering
TEMPLATE = r"""{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{% block extra_css %}<style type="text/css">{{ resources.course.css }}</style>{% endblock extra_css %}
{%- block body_header -%}
{{ super() }}
{{ resources.course.header }}
{%- endblock body_header -%}
{% block body_footer %}
{{ resources.course.footer }}
{{ super() }}
{% endblock body_footer %}
{% block codecell %}
{%- set tags = cell.metadata.get('tags', []) -%}
{%- if 'setup' in tags -%}
<details class="course-fold course-setup"><summary>Set-up cell: on Colab or Kaggle it clones and installs the course;
locally it does nothing</summary>
{{ super() }}
</details>
{%- elif 'injected-parameters' in tags -%}
<details class="course-fold"><summary>Parameters injected by papermill</summary>
{{ super() }}
</details>
{%- elif 'solution' in tags -%}
<details class="course-fold course-solution"><summary>Solution (it checks itself)</summary>
{{ super() }}
</details>
{%- else -%}
{{ super() }}
{%- endif -%}
{% endblock codecell %}
{% block input_group %}
{%- set tags = cell.metadata.get('tags', []) -%}
{%- if cell.metadata.get('jupyter', {}).get('source_hidden') and 'solution' not in tags and 'setup' not in tags -%}
<details class="course-fold course-hidden-source"><summary>
{%- if 'checks' in tags -%}Closing check: the code that asserts what this run measured{%- else -%}Code{%- endif -%}
</summary>
{{ super() }}
</details>
{%- else -%}
{{ super() }}
{%- endif -%}
{% endblock input_group %}
"""

CSS = """
body { margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 0 16px 24px; }
.course-bar { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: center; padding: 10px 0;
  border-bottom: 1px solid #ddd; margin-bottom: 8px; font-family: system-ui, sans-serif; font-size: 14px; }
.course-bar a { text-decoration: none; color: #1a5fb4; }
.course-bar a:hover { text-decoration: underline; }
.course-bar .course-home { font-weight: 700; }
.course-bar .course-next { margin-left: auto; }
.course-bar .course-prev, .course-bar .course-next { max-width: 40%; overflow: hidden; text-overflow: ellipsis;
  white-space: nowrap; }
.course-bottom { border-top: 1px solid #ddd; border-bottom: none; margin-top: 24px; }
.course-links { display: flex; flex-wrap: wrap; gap: 8px; margin: 8px 0 4px; font-family: system-ui, sans-serif; }
.course-links a { font-size: 13px; padding: 3px 10px; border-radius: 4px; color: #fff; text-decoration: none; }
.course-links .colab { background: #e8710a; } .course-links .kaggle { background: #20beff; }
.course-links .source { background: #444; }
.course-run { font: 13px system-ui, sans-serif; color: #555; margin: 4px 0 12px; }
.course-toc { font: 13px system-ui, sans-serif; columns: 2; margin: 8px 0; padding-left: 0; list-style: none; }
.course-toc a { color: #1a5fb4; text-decoration: none; } .course-toc .current a { font-weight: 700; }
details.course-fold { border-left: 3px solid #c0c0c0; margin: 6px 0; padding-left: 6px; }
details.course-fold > summary { cursor: pointer; font: 13px system-ui, sans-serif; color: #444; padding: 4px 0; }
details.course-solution { border-left-color: #2e7d32; }
.course-progress { font: 12px monospace; display: flex; gap: 8px; align-items: center; }
.status-ok { color: #2e7d32; } .status-FAILED { color: #c62828; font-weight: 700; } .status-SKIPPED { color: #8a6d00; }
math { font-size: 1.1em; } math[display="block"] { margin: 8px 0; }
"""

INDEX_CSS = """
body { font: 15px/1.5 system-ui, sans-serif; color: #222; }
h1 { margin: 16px 0 4px; }
.course-machine { background: #f4f6f8; border: 1px solid #dde3e8; border-radius: 6px; padding: 8px 12px; }
ol.course-map { list-style: none; padding: 0; }
.course-chapter { border: 1px solid #ddd; border-radius: 8px; padding: 8px 16px; margin: 12px 0; }
.course-chapter h2 { font-size: 19px; margin: 6px 0; }
.course-chapter h2 a { color: #1a5fb4; text-decoration: none; }
.course-meta { font-size: 13px; color: #555; }
.course-measured { margin: 6px 0; }
.course-chapter ul { margin: 4px 0; }
.course-chapter table { border-collapse: collapse; font-size: 13px; }
.course-chapter td { border-top: 1px solid #eee; padding: 1px 8px; font-family: monospace; }
code { background: #f4f4f4; padding: 0 3px; border-radius: 3px; }
"""


def _mathml(tex: str, display: str = "inline") -> str:
    """LaTeX as MathML (rendered by the browser, no script); the TeX source as code if it cannot be converted."""
    from latex2mathml.converter import convert

    try:
        return convert(tex.strip(), display=display)
    except Exception:  # noqa: BLE001 - any conversion failure shows the source instead
        return f'<code class="course-tex">{html.escape(tex)}</code>'


@functools.lru_cache(maxsize=1)
def _exporter():
    """nbconvert's HTML exporter with the course's template, whose markdown turns math into MathML."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter
    from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

    class Renderer(IPythonRenderer):
        def block_math(self, body: str) -> str:
            return _mathml(body, "block")

        def inline_math(self, body: str) -> str:
            return _mathml(body)

        def latex_environment(self, name: str, body: str) -> str:
            return _mathml(f"\\begin{{{name}}}{body}\\end{{{name}}}", "block")

    def markdown2html(source: str) -> str:
        return MarkdownWithMath(renderer=Renderer(escape=False)).render(source)

    exporter = HTMLExporter(template_name="lab", extra_loaders=[DictLoader({"course.html.j2": TEMPLATE})],
                            template_file="course.html.j2", filters={"markdown2html": markdown2html})
    return exporter, markdown2html


def _link(href: str, text: str, cls: str = "", rel: str = "") -> str:
    attrs = (f' class="{cls}"' if cls else "") + (f' rel="{rel}" title="{html.escape(text)}"' if rel else "")
    return f'<a href="{html.escape(href)}"{attrs}>{html.escape(text)}</a>'


def navigation(chapters: list[Chapter], current: str | None, bottom: bool = False) -> str:
    """The bar on every page: course map, previous and next chapter, and (at the bottom) every chapter."""
    pages = [c.page for c in chapters]
    i = pages.index(current) if current in pages else -1
    parts = [_link("index.html", "lora-course · course map", "course-home", "index")]
    if i > 0:
        parts.append(_link(chapters[i - 1].page, f"← {chapters[i - 1].title}", "course-prev", "prev"))
    if 0 <= i < len(chapters) - 1:
        parts.append(_link(chapters[i + 1].page, f"{chapters[i + 1].title} →", "course-next", "next"))
    bar = f'<nav class="course-bar{" course-bottom" if bottom else ""}" aria-label="chapters">{" ".join(parts)}</nav>'
    if not bottom:
        return bar
    toc = "".join(f'<li{" class=current" if c.page == current else ""}>{_link(c.page, c.title)}</li>'
                  for c in chapters)
    return bar + f'<ol class="course-toc">{toc}</ol>'


def chapter_links(notebook: str) -> str:
    """Open in Colab, open in Kaggle, the source in the repository: text links (no image to fetch)."""
    source = f"{REPO_URL}/blob/{REPO_BRANCH}/notebooks/{notebook}"
    return ('<div class="course-links">' + _link(colab_url(notebook), "Open in Colab", "colab")
            + _link(kaggle_url(notebook), "Open in Kaggle", "kaggle")
            + _link(source, f"Source: notebooks/{notebook}", "source") + "</div>")


def _machine_line(report: dict[str, Any]) -> str:
    m = report.get("machine", {})
    flags = ", ".join(k for k, v in m.get("flags", {}).items() if v) or "none of AVX2/AVX-512/AMX"
    libs = ", ".join(f"{k} {m[k]}" for k in ("torch", "transformers", "peft", "trl") if k in m)
    return (f"Measured by <code>make course</code> on {html.escape(str(m.get('cpu', '?')))} "
            f"({m.get('cores', '?')} cores; CPU flags {html.escape(flags)}), {html.escape(str(m.get('date', '?')))}"
            f"{'; ' + html.escape(libs) if libs else ''}: {report.get('passed', 0)} ok, {report.get('failed', 0)} "
            f"failed, {report.get('skipped', 0)} skipped.")


def _run_line(c: Chapter) -> str:
    return (f'<span class="status-{html.escape(c.status)}">{html.escape(c.status)}</span> · {c.seconds:.0f} s · '
            f'{c.figures} figure{"" if c.figures == 1 else "s"}'
            + (f" · {html.escape(c.error)}" if c.error else ""))


def measured(c: Chapter) -> str:
    """The chapter's key figures, as README's course map shows them (empty when a metric is missing)."""
    from .readme import LANE_METRICS

    try:
        return LANE_METRICS[c.stem](c.metrics) if c.stem in LANE_METRICS else ""
    except (KeyError, TypeError, ValueError):
        return ""


def render_page(nb: dict[str, Any], chapter: Chapter, chapters: list[Chapter], report: dict[str, Any]) -> str:
    """One executed notebook as a page of the site."""
    import nbformat

    exporter, _ = _exporter()
    header = (navigation(chapters, chapter.page) + chapter_links(chapter.notebook)
              + f'<p class="course-run">This run: {_run_line(chapter)}. {_machine_line(report)}</p>')
    resources = {"course": {"css": CSS, "header": header, "footer": navigation(chapters, chapter.page, True)},
                 "metadata": {"name": chapter.title}}
    node = nbformat.reads(json.dumps(prepare(nb, chapter)), as_version=4)  # sources as strings, as nbconvert wants
    body, _ = exporter.from_notebook_node(node, resources=resources)
    return fix_links(body, chapters)


def render_index(chapters: list[Chapter], report: dict[str, Any]) -> str:
    """The landing page: the course map with each chapter's objectives and measured results, and the machine."""
    _, md = _exporter()
    items = []
    for c in chapters:
        objectives = md("\n".join(f"- {o}" for o in c.objectives)) if c.objectives else ""
        figures = measured(c)
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in sorted(c.metrics.items()))
        items.append(
            f'<li class="course-chapter" id="{c.stem}"><h2>{_link(c.page, c.title)}</h2>'
            f'<div class="course-meta">{_run_line(c)}</div>'
            + (f'<p class="course-measured"><b>Measured:</b> {html.escape(figures)}</p>' if figures else "")
            + (f"<div><b>Learning objectives</b>{objectives}</div>" if objectives else "")
            + (f"<details><summary>All {len(c.metrics)} recorded metrics</summary><table>{rows}</table></details>"
               if rows else "")
            + chapter_links(c.notebook) + "</li>")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>lora-course · the executed course</title><style>{CSS}{INDEX_CSS}</style></head>
<body><main>{navigation(chapters, None)}
<h1>lora-course: the executed course</h1>
<p>A Jupyter-first course on parameter-efficient fine-tuning of language models (LoRA, QLoRA, SFT, adapters,
GGUF export). Every page below is a notebook as <code>make course</code> executed it, with its outputs: each claim
is measured and asserted in the notebook itself, and its closing check shows what was recorded.</p>
<p class="course-machine">{_machine_line(report)}</p>
<ol class="course-map">{"".join(items)}</ol>
{navigation(chapters, None, True)}</main></body></html>
"""
    return fix_links(page, chapters)


# --------------------------------------------------------------------------------------- links and loads
_LOADING = {"script": "src", "img": "src", "iframe": "src", "embed": "src", "source": "src", "audio": "src",
            "video": "src", "input": "src", "object": "data"}


def external_loads(page: str) -> list[str]:
    """Every address ``page`` would fetch from another host when opened (scripts, stylesheets, images, frames,
    CSS ``url()`` and ``@import``); links a reader may click (``<a href>``) are not loads."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(page, "html.parser")
    found = [tag[attr] for name, attr in _LOADING.items() for tag in soup.find_all(name) if tag.get(attr)]
    found += [tag["href"] for tag in soup.find_all("link") if tag.get("href")]
    found += [tag.get("srcset", "") for tag in soup.find_all(["img", "source"]) if tag.get("srcset")]
    css = " ".join(t.get_text() for t in soup.find_all("style")) + " ".join(
        t.get("style", "") for t in soup.find_all(style=True))
    found += re.findall(r"url\(\s*['\"]?([^'\")]+)", css) + re.findall(r"@import\s+['\"]([^'\"]+)", css)
    return sorted({u for u in found if re.match(r"^(https?:)?//", u.strip())})


def fix_links(page: str, chapters: list[Chapter]) -> str:
    """Links between notebooks (``NN_topic.ipynb``) point at their pages; other relative links (README, docs/) at
    the repository; an image from another host becomes a link to it. Refuses a page that would still load anything
    from another host."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(page, "html.parser")
    names = {c.notebook for c in chapters}
    pages = {"index.html", *(c.page for c in chapters)}
    for a in soup.find_all("a", href=True):
        href = a["href"]
        if re.match(r"^([a-z][a-z0-9+.-]*:|#|//)", href, re.IGNORECASE) or not href:
            continue
        target, _, anchor = href.partition("#")
        name = Path(target).name
        if target in pages:
            continue  # the site's own navigation
        if name in names and NAME_RE.match(name):
            a["href"] = name.removesuffix(".ipynb") + ".html" + (f"#{anchor}" if anchor else "")
        else:
            path = (Path("notebooks") / target).as_posix()
            parts: list[str] = []
            for p in path.split("/"):
                parts = parts[:-1] if p == ".." else parts if p in ("", ".") else [*parts, p]
            a["href"] = f"{REPO_URL}/blob/{REPO_BRANCH}/{'/'.join(parts)}" + (f"#{anchor}" if anchor else "")
    for img in soup.find_all("img", src=True):
        if re.match(r"^(https?:)?//", img["src"]):
            link = soup.new_tag("a", href=img["src"])
            link.string = img.get("alt") or img["src"]
            img.replace_with(link)
    out = str(soup)
    loads = external_loads(out)
    if loads:
        raise ValueError(f"a site page would load {loads} from another host; the site must work offline: vendor "
                         "the file into the page or drop it (lora_course.site.TEMPLATE)")
    return out


def build_site(build: Path = Path("build"), out: Path = Path("build/site")) -> list[Path]:
    """Write the site of the executed course in ``build`` to ``out``: ``index.html`` and one page per notebook."""
    chapters, report = find_chapters(build)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.html"):
        stale.unlink()
    written = [write_text_atomic(out / "index.html", render_index(chapters, report))]
    for c in chapters:
        nb = json.loads((Path(build) / c.notebook).read_text(encoding="utf-8"))
        written.append(write_text_atomic(out / c.page, render_page(nb, c, chapters, report)))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", type=Path, default=Path("build"), help="make course's output folder")
    p.add_argument("--out", type=Path, default=Path("build/site"))
    a = p.parse_args(argv)
    try:
        pages = build_site(a.build, a.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"make site: {err}", file=sys.stderr)
        return 1
    chapters, _ = find_chapters(a.build)
    bare = [c.stem for c in chapters if not c.figures]
    print(f"site: {len(pages)} pages in {a.out} (open {a.out / 'index.html'})")
    if bare:
        print(f"site: chapters without a figure: {', '.join(bare)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
