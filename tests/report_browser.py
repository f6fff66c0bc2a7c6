"""The HTML report (snakemake --report) opened in a real headless browser (Debian's chromium): every result shown
the way the report's own buttons show it, then measured. Shared by the smoke and the folder workflow tests."""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
# Injected into a copy of the report: shows every result the way the report's own result buttons do
# (app.setView with the result's data URI), waits for the <img> to load, and measures it (natural size,
# laid-out size, and how many pixels differ from white, drawn on a canvas); table results must hold a <table>.
CHECK_SCRIPT = """
<script>
window.addEventListener("load", async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  for (let i = 0; i < 400 && (typeof app === "undefined" || !app); i++) await sleep(50);  // React renders after load
  const out = [];
  for (const [path, entry] of Object.entries(results)) {
    const record = {path: path, mime: entry.mime_type, caption: (entry.caption || "").length};
    if (entry.mime_type.startsWith("image/")) {
      app.setView({content: "img", contentPath: entry.data_uri, resultPath: path});
      let img = null;
      for (let i = 0; i < 200; i++) {
        await sleep(50);
        img = Array.from(document.querySelectorAll("#app img")).find(x => x.getAttribute("src") === entry.data_uri);
        if (img && img.complete) break;
      }
      if (img) {
        record.naturalWidth = img.naturalWidth;
        record.naturalHeight = img.naturalHeight;
        record.shownWidth = img.getBoundingClientRect().width;
        const canvas = document.createElement("canvas");
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const ctx = canvas.getContext("2d");
        ctx.drawImage(img, 0, 0);
        const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
        let ink = 0;
        for (let p = 0; p < data.length; p += 4) if (data[p] < 200 || data[p + 1] < 200 || data[p + 2] < 200) ink++;
        record.inkFraction = ink / (canvas.width * canvas.height);
      }
    } else if (entry.mime_type === "text/html") {
      app.setView({content: "html", contentPath: entry.data_uri, resultPath: path});
      await sleep(200);
      record.iframe = !!Array.from(document.querySelectorAll("#app iframe")).find(x => x.getAttribute("src") === entry.data_uri);
      const text = decodeURIComponent(escape(atob(entry.data_uri.split("base64,")[1])));
      record.rows = (text.match(/<tr>/g) || []).length;
    }
    out.push(record);
  }
  const pre = document.createElement("pre");
  pre.id = "tda-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def rendered_results(report: Path, tmp_path: Path) -> dict[str, dict]:
    """{file name: what the browser measured} for every result of the report (images: natural and laid-out size,
    ink fraction, caption length; HTML tables: iframe shown, row count). Skips, saying why, without chromium."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it)")
    page = tmp_path / "report-check.html"
    head, body_end, tail = Path(report).read_text().rpartition("</body>")
    page.write_text(head + CHECK_SCRIPT + body_end + tail)
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1400,1000",
            "--virtual-time-budget=60000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    match = re.search(r'<pre id="tda-check">(.*?)</pre>', result.stdout, re.S)
    assert match, f"the check script did not finish (exit {result.returncode}):\n{result.stderr[-3000:]}"
    records = json.loads(html.unescape(match.group(1)))
    return {Path(r["path"]).name: r for r in records}
