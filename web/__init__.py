"""The playground: ``lorareg serve`` (a local web app over the catalog) and the static gallery of ``export-site``.

As thin over :mod:`lorareg.registry` and :mod:`loralib` as the CLI is:

- :mod:`lorareg.web.app`: the Starlette application and its pages (Jinja2, autoescaped);
- :mod:`lorareg.web.security`: Host check, access token, per-session CSRF token, security headers;
- :mod:`lorareg.web.jobs` and :mod:`lorareg.web.actions`: merge, resize, convert, generate and
  push as background jobs, calling the same functions as the commands;
- :mod:`lorareg.web.views`, :mod:`lorareg.web.graph`, :mod:`lorareg.web.media`: what the pages
  show, the lineage graph's layout, and the images that may be served;
- :mod:`lorareg.web.site`: the static gallery; :mod:`lorareg.web.server`: running it all.

Needs the ``web`` extra (starlette, uvicorn, jinja2, python-multipart).
"""
