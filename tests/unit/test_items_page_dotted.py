"""The items page's download links name the database with ``db=`` (and a table of it with ``dump=``): one called
'shop.public.orders' would be read as table 'orders' of 'shop' in ``dump=DB.TABLE`` (real app and template)."""

from __future__ import annotations

import html
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from flask import render_template

from appliance.items.discovery import Item
from appliance.items.postgres import Table
from web import create_app


def test_the_page_downloads_a_dotted_database_whole_by_its_db_parameter(tmp_path: Path) -> None:
    app = create_app({"STATE_DIR": tmp_path, "TESTING": True})
    item = Item("postgres", "disk.raw", "p1", "/srv/pg", "15")
    tables = [Table("shop.public.orders", "public", "marker", 1)]
    with app.test_request_context("/items"):
        page = render_template(
            "items.html", repository="repo", point="dots01@x", error=None, item=item, kind="postgres", tables=tables
        )
    whole = re.search(r'class="download database" href="([^"]+)"', page)
    table = re.search(r'class="download" href="([^"]+)"', page)
    assert whole and table, page
    whole_q, table_q = (parse_qs(urlsplit(html.unescape(m.group(1))).query) for m in (whole, table))
    assert whole_q["db"] == ["shop.public.orders"] and "dump" not in whole_q, whole_q
    assert table_q["db"] == ["shop.public.orders"] and table_q["dump"] == ["public.marker"], table_q
