"""A page on another site against the annotator's default server (auth off, 127.0.0.1), in a real browser.

Debian's chromium (Playwright) opens a page served from ``http://localhost:PORT`` (another site than
``http://127.0.0.1:SERVER``) whose own script tries what issue 20 measured: delete a study, start a
training with a "simple" cross-site POST (no preflight), and read an image and /info. The page writes
what its script saw into the page; the test reads it and checks the server's side.
"""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import nibabel as nib
import pytest
import requests

from mrannotator.phantoms import make_phantom
from mrannotator.testing.server_support import free_port, start_server, stop_server

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts" / "cross_site"
EVIL_PAGE = """<!doctype html><html><body><h1>A page on another site</h1><pre id="out">running</pre><script>
const server = new URLSearchParams(location.search).get("server");
async function attempt(name, path, init) {
  try {
    const r = await fetch(server + path, init || {});
    let body = null;
    try { body = (await r.text()).slice(0, 200); } catch (e) { body = "unreadable: " + e; }
    return {name, answered: true, status: r.status, type: r.type, body};
  } catch (e) { return {name, answered: false, error: String(e)}; }
}
(async () => {
  const results = [
    await attempt("delete", "/datastore/image?id=victim", {method: "DELETE"}),
    await attempt("train", "/train/mrannotator", {method: "POST", mode: "no-cors",
                                                  headers: {"Content-Type": "text/plain"}, body: "{}"}),
    await attempt("read_image", "/datastore/image?image=victim"),
    await attempt("read_info", "/info/", {credentials: "include"}),
  ];
  document.getElementById("out").textContent = JSON.stringify(results);
})();
</script></body></html>"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_weights):
    root = tmp_path_factory.mktemp("cross_site")
    studies = root / "studies"
    studies.mkdir()
    nib.save(make_phantom("abdomen", seed=8500).image, studies / "victim.nii.gz")
    srv = start_server(root, studies, demo_weights)
    srv.studies = studies
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def evil_site():
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = EVIL_PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    port = free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Page)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{port}"
    httpd.shutdown()
    httpd.server_close()


def test_a_page_on_another_site_can_neither_act_on_nor_read_the_loopback_server(server, evil_site):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{evil_site}/?server={server.url}")
            page.wait_for_function("document.getElementById('out').textContent !== 'running'", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "evil_page.png"))
            results = {r["name"]: r for r in json.loads(page.locator("#out").text_content())}
        finally:
            browser.close()
    print(f"\nwhat the other site's page saw: {json.dumps(results, indent=1)}")
    # DELETE needs a preflight, which gets no CORS permission: the DELETE is never sent, the study stays
    assert results["delete"]["answered"] is False
    assert (server.studies / "victim.nii.gz").is_file()
    # a "simple" POST is sent without asking (no-cors): the server refuses it, no training starts
    assert results["train"]["type"] == "opaque"
    log = server.log_text()
    assert "refused POST /train/mrannotator" in log and evil_site in log
    assert "RUNNING" not in requests.get(f"{server.url}/train/", timeout=30).text
    # reads: the answers carry no CORS header, so the page cannot read them
    assert results["read_image"]["answered"] is False and results["read_info"]["answered"] is False
    # the same requests from the server's own origin (the served OHIF) or from a script work
    assert requests.get(f"{server.url}/datastore/image?image=victim", timeout=60).status_code == 200
