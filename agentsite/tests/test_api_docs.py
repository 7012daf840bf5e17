"""/api/docs works offline: Swagger UI comes from our own static files, never a CDN."""

import re
from urllib.parse import urlsplit

from django.contrib.staticfiles import finders
from django.test import Client

ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


def test_the_docs_page_loads_nothing_from_another_host(settings):
    page = Client().get("/api/docs")
    assert page.status_code == 200
    html = page.content.decode()
    assets = ASSET.findall(html)

    assert any(a.endswith("swagger-ui-bundle.js") for a in assets), assets
    assert [a for a in assets if urlsplit(a).netloc] == []  # same host only
    assert '"validatorUrl": null' in html  # no badge fetched from swagger.io
    for asset in assets:
        # Each one is a static file that runserver serves and collectstatic collects.
        path = urlsplit(asset).path
        assert path.startswith(settings.STATIC_URL), asset
        assert finders.find(path.removeprefix(settings.STATIC_URL)), asset
