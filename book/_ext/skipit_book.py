"""Small Sphinx fixes for the skipit book (a local extension, loaded by _config.yml).

* Identical inline scripts are written once per page. sphinx-thebe (which Jupyter Book always
  loads) registers its inline ``const THEBE_JS_URL = ...`` both with the registry and with the
  already-initialised HTML builder under Sphinx 7 (once with filename None, once with ""), so every page declared the constant twice and the
  browser raised "Identifier 'THEBE_JS_URL' has already been declared". The book's browser test
  fails on any JavaScript error, so the duplicate is dropped here.
"""

from __future__ import annotations


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for js in scripts:
        key = (getattr(js, "filename", js) or "",  # the same script is added once as None, once as ""
                repr(sorted(getattr(js, "attributes", {}).items())))
        if key in seen:
            continue
        seen.add(key)
        kept.append(js)
    scripts[:] = kept


def setup(app):
    # early: html-page-context stops at the first handler that returns a template name
    app.connect("html-page-context", _dedupe_scripts, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

