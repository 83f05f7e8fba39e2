"""``make site`` (lora_course.site) on a tiny synthetic executed course: pages, navigation, folded cells, offline pages.

No browser here: ``make test`` runs scripts/site_check.py (headless Chromium) on the real site after the notebooks.
"""
import base64
import json
import struct
import zlib
from pathlib import Path

import pytest
from bs4 import BeautifulSoup

from lora_course import site
from lora_course.notebook import badges_markdown, code_cell, markdown_cell, new_notebook
from lora_course.paths import REPO_BRANCH, REPO_URL, colab_url, kaggle_url

NAMES = ["00_alpha.ipynb", "01_beta.ipynb", "02_gamma.ipynb"]


def _png(w=3, h=2) -> str:
    """A real w x h PNG (red pixels), base64 as notebooks store it."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * w for _ in range(h))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


def _hidden(cell, tag):
    cell["metadata"] = {"tags": [tag], "jupyter": {"source_hidden": True}}
    return cell


def _executed(name: str, nxt: str | None) -> dict:
    """An executed notebook as papermill leaves it: outputs, a tqdm widget with its saved state, a figure."""
    title = markdown_cell(f"# {name[:2]} · Chapter {name[3:-6]}\n\n{badges_markdown(name)}\n\n"
                          "**Learning objectives**\n\n"
                          "- Write the update $\\Delta W = BA$ and check it.\n- Measure a thing,\n  on two lines.\n\n"
                          "Prose after the list.")
    setup = code_cell("import os  # SETUP-SOURCE", tags=["setup"])
    params = code_cell("PROFILE = 'cpu'", tags=["parameters"])
    widget = code_cell("for _ in tqdm(range(3)): pass")
    widget["outputs"] = [{"output_type": "display_data", "metadata": {}, "data": {
        "text/plain": "Loading:   0%|          | 0/3", site.WIDGET_VIEW: {"model_id": "box", "version_major": 2}}}]
    figure = code_cell("plt.plot([1, 2]); plt.show()")
    figure["outputs"] = [{"output_type": "display_data", "metadata": {},
                          "data": {"image/png": _png(), "text/plain": "<Figure size 640x480 with 1 Axes>"}}]
    links = markdown_cell("See [the next one](" + (nxt or "../README.md") + ") and [a section](#top); "
                          "$$\\frac{\\partial L}{\\partial B} = s\\, g^\\top x$$")
    solution = _hidden(code_cell("assert 1 + 1 == 2  # SOLUTION-SOURCE"), "solution")
    solution["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "SOLUTION-OUTPUT\n"}]
    checks = _hidden(code_cell("assert True  # CHECKS-SOURCE\nrecord_metric('x', 1)"), "checks")
    checks["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "[metric] x = 1\n"}]
    nb = new_notebook([title, setup, params, widget, figure, links, markdown_cell("### Exercise 1"), solution,
                       markdown_cell("## Closing check"), checks])
    for i, c in enumerate(nb["cells"]):
        c["id"] = f"c{i:02d}"
    state = {"box": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_a", "IPY_MODEL_b", "IPY_MODEL_c"]}},
             "a": {"model_name": "HTMLModel", "state": {"value": "Loading:\u2007100%"}},
             "b": {"model_name": "FloatProgressModel", "state": {"value": 3.0, "max": 3.0}},
             "c": {"model_name": "HTMLModel", "state": {"value": "\u20073/3\u2007[00:00&lt;00:00]"}}}
    nb["metadata"]["widgets"] = {site.WIDGET_STATE: {"state": state, "version_major": 2, "version_minor": 0}}
    return nb


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    build = tmp_path_factory.mktemp("build")
    rows = []
    for i, name in enumerate(NAMES):
        nxt = NAMES[i + 1] if i + 1 < len(NAMES) else None
        (build / name).write_text(json.dumps(_executed(name, nxt)))
        rows.append({"notebook": name, "ok": True, "seconds": 12.0 + i, "metrics": {"x": 1, "alpha_score": 0.75},
                     "error": "", "skipped": "", "status": "ok"})
    report = {"machine": {"cpu": "Test CPU 9000", "cores": 2, "flags": {"avx2": True, "avx512f": False},
                          "date": "2026-12-05 09:27", "torch": "2.13.0+cpu"},
              "passed": 3, "failed": 0, "skipped": 0, "notebooks": rows}
    (build / site.REPORT).write_text(json.dumps(report))
    out = build / "site"
    written = site.build_site(build, out)
    pages = {p.name: BeautifulSoup(p.read_text(), "html.parser") for p in written}
    return build, out, pages


def test_one_page_per_notebook_and_a_landing_page(built):
    _, out, pages = built
    assert sorted(pages) == sorted(["index.html", "00_alpha.html", "01_beta.html", "02_gamma.html"])
    assert all((out / name).is_file() for name in pages)


def test_navigation_course_map_previous_next_and_every_chapter_on_every_page(built):
    _, _, pages = built
    order = ["00_alpha.html", "01_beta.html", "02_gamma.html"]
    for i, name in enumerate(order):
        soup = pages[name]
        rel = {a["rel"][0]: a["href"] for a in soup.select("nav.course-bar a[rel]")}
        assert rel["index"] == "index.html"
        assert rel.get("prev") == (order[i - 1] if i else None)
        assert rel.get("next") == (order[i + 1] if i + 1 < len(order) else None)
        assert [a["href"] for a in soup.select(".course-toc a")] == order
        assert len(soup.select("nav.course-bar")) == 2  # top and bottom
    assert [a["href"] for a in pages["index.html"].select(".course-toc a")] == order
    assert {a["href"] for a in pages["index.html"].select(".course-chapter h2 a")} == set(order)


def test_setup_and_solutions_fold_whole_the_closing_check_folds_its_source_and_shows_its_output(built):
    soup = built[2]["01_beta.html"]
    setup = soup.select_one("details.course-setup")
    assert setup is not None and "SETUP-SOURCE" in setup.get_text()
    solution = soup.select_one("details.course-solution")
    assert "SOLUTION-SOURCE" in solution.get_text() and "SOLUTION-OUTPUT" in solution.get_text()
    checks = soup.select_one(".celltag_checks")
    folded = checks.select_one("details.course-hidden-source")
    assert "CHECKS-SOURCE" in folded.get_text() and "[metric] x = 1" not in folded.get_text()
    output = checks.select_one(".jp-OutputArea-output")
    assert "[metric] x = 1" in output.get_text() and output.find_parent("details") is None
    # the parameters cell and the figure stay open
    assert soup.select_one(".celltag_parameters").find_parent("details") is None


def test_pages_load_nothing_from_another_host_and_link_out_only_to_colab_kaggle_and_the_source(built):
    _, _, pages = built
    for name, soup in pages.items():
        text = str(soup)
        assert site.external_loads(text) == [], name
        assert not soup.find_all("script", src=True) and not soup.find_all("link", href=True), name
        assert "mathjax" not in text.lower() and "require.js" not in text and "unpkg" not in text, name
        assert not [i["src"] for i in soup.find_all("img") if not i["src"].startswith("data:")], name
        external = {a["href"] for a in soup.find_all("a", href=True) if a["href"].startswith(("http:", "https:"))}
        allowed = {u for nb in NAMES for u in (colab_url(nb), kaggle_url(nb),
                                               f"{REPO_URL}/blob/{REPO_BRANCH}/notebooks/{nb}")}
        allowed.add(f"{REPO_URL}/blob/{REPO_BRANCH}/README.md")  # the last chapter's relative link
        assert external <= allowed, (name, external - allowed)
        assert "colab-badge.svg" not in text and "open-in-kaggle.svg" not in text, name


def test_figures_math_widgets_and_links_become_static_html(built):
    _, _, pages = built
    soup = pages["00_alpha.html"]
    imgs = soup.select(".jp-OutputArea-output img")
    assert len(imgs) == 1 and imgs[0]["src"].startswith("data:image/png;base64,")
    assert len(soup.find_all("math")) == 2 and soup.find("math", display="block") is not None
    assert "$" not in soup.select_one(".jp-MarkdownCell").get_text()
    progress = soup.select_one(".course-progress")
    assert progress.find("progress")["value"] == "3.0" and "100%" in progress.get_text()
    assert "0/3" not in soup.get_text()  # the stale text/plain of the widget is not shown
    hrefs = [a["href"] for a in soup.select(".jp-MarkdownCell a")]
    assert "01_beta.html" in hrefs and "#top" in hrefs
    last = [a["href"] for a in pages["02_gamma.html"].select(".jp-MarkdownCell a")]
    assert f"{REPO_URL}/blob/{REPO_BRANCH}/README.md" in last
    links = [a["href"] for a in soup.select(".course-links a")]
    assert links == [colab_url("00_alpha.ipynb"), kaggle_url("00_alpha.ipynb"),
                     f"{REPO_URL}/blob/{REPO_BRANCH}/notebooks/00_alpha.ipynb"]


def test_landing_page_shows_objectives_results_and_the_machine(built):
    text = built[2]["index.html"].get_text(" ")
    for want in ("Test CPU 9000", "avx2", "2026-12-05 09:27", "torch 2.13.0+cpu", "3 ok, 0 failed",
                 "Measure a thing, on two lines.", "alpha_score", "0.75", "12 s", "1 figure"):
        assert want in text, want
    assert "avx512f" not in text  # flags the CPU lacks are not listed
    assert built[2]["index.html"].select_one(".course-chapter math") is not None


def test_image_outputs_and_objectives_are_read_from_the_notebook(built):
    nb = _executed("00_alpha.ipynb", None)
    assert site.image_outputs(nb) == 1
    title, objectives = site.title_and_objectives(nb)
    assert title == "00 · Chapter alpha"
    assert objectives == ["Write the update $\\Delta W = BA$ and check it.", "Measure a thing, on two lines."]
    chapters, _ = site.find_chapters(built[0])
    assert [c.figures for c in chapters] == [1, 1, 1] and chapters[1].page == "01_beta.html"


def test_external_loads_finds_what_a_page_would_fetch_and_the_build_refuses_it():
    page = ('<html><head><script src="https://cdn.example/x.js"></script>'
            '<link rel="stylesheet" href="//fonts.example/f.css">'
            '<style>body { background: url("https://img.example/bg.png") }</style></head><body>'
            '<img src="data:image/png;base64,AA"><a href="https://example.org/paper">a paper</a></body></html>')
    assert site.external_loads(page) == ["//fonts.example/f.css", "https://cdn.example/x.js",
                                         "https://img.example/bg.png"]
    with pytest.raises(ValueError, match="offline"):
        site.fix_links(page, [])
    fixed = site.fix_links('<p><img alt="a badge" src="https://badge.example/b.svg"></p>', [])
    assert site.external_loads(fixed) == [] and 'href="https://badge.example/b.svg"' in fixed


def test_a_build_folder_without_an_executed_course_names_make_course(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="make course"):
        site.build_site(tmp_path / "nowhere", tmp_path / "site")
    with pytest.raises(FileNotFoundError, match="make course"):
        site.find_chapters(tmp_path)  # a folder without course-report.json
    (tmp_path / site.REPORT).write_text(json.dumps({"notebooks": [{"notebook": "00_alpha.ipynb"}]}))
    with pytest.raises(FileNotFoundError, match="00_alpha.ipynb.*make course"):
        site.find_chapters(tmp_path)
    assert site.main(["--build", str(tmp_path / "nowhere"), "--out", str(tmp_path / "site")]) == 1
    assert "make course" in capsys.readouterr().err
    assert not Path(tmp_path / "site").exists()
