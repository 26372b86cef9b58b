"""The chat page ships inside the Python package.

* The checked-in MessagePack bundle (``zrpc/web/vendor/msgpack.mjs``) is what
  ``scripts/build_web_vendor.py`` builds from the version the npm lock pins.
* A wheel built from this checkout, installed into a fresh virtualenv outside
  it, serves the page and every file the page loads (stylesheet, scripts and
  what they import, recursively) with no npm and no checkout at run time.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import ssl
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path
from types import ModuleType

import pytest

from procs import ROOT, Proc, wait_for

WEB = ROOT / "zrpc" / "web"
BUNDLE = WEB / "vendor" / "msgpack.mjs"


def build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_web_vendor", ROOT / "scripts" / "build_web_vendor.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundle_header_names_the_locked_version() -> None:
    pin = build_script().locked()
    head = BUNDLE.read_text().splitlines()[0]
    assert f"@msgpack/msgpack {pin['version']} (lock integrity {pin['integrity']})" in head


def test_checked_in_bundle_matches_a_fresh_build() -> None:
    script = build_script()
    if not (WEB / "node_modules" / "@msgpack" / "msgpack" / "package.json").is_file():
        if os.environ.get("CI"):
            pytest.fail("zrpc/web/node_modules is missing: scripts/test runs `npm ci --prefix zrpc/web`")
        pytest.skip("zrpc/web/node_modules is missing: run `npm ci --prefix zrpc/web`")
    assert script.build() == BUNDLE.read_text(), "run scripts/build_web_vendor.py and commit the result"


def test_every_page_file_is_package_data() -> None:
    """setup.cfg lists the files broker/web.py serves (a file missing there would 404 from a wheel)."""
    from broker.web import PAGES

    declared = set(re.findall(r"^\s+web/(\S+)$", (ROOT / "setup.cfg").read_text(), re.M))
    assert set(PAGES.values()) <= declared


# ------------------------------------------------------------------ the wheel, installed elsewhere


def _imports(text: str) -> list[str]:
    """Module specifiers a script imports (static and dynamic)."""
    found = re.findall(r"""^\s*(?:import|export)\b[^'"`;]*?\bfrom\s*["']([^"']+)["']""", text, re.M)
    found += re.findall(r"""^\s*import\s*["']([^"']+)["']""", text, re.M)
    found += re.findall(r"""\bimport\(\s*["']([^"']+)["']\s*\)""", text)
    return found


def _page_links(html: str) -> list[str]:
    return re.findall(r"""<(?:script|link)\b[^>]*\b(?:src|href)=["']([^"']+)["']""", html)


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_wheel_installed_elsewhere_serves_the_page(tmp_path: Path) -> None:
    # Build from a copy, so the checkout gets no build/ or egg-info.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "node_modules", "__pycache__", "*_cache", ".hypothesis", "build", "dist",
        "*.egg-info", "test-artifacts", "results"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(dist), str(src)], check=True, timeout=120,
                   capture_output=True)
    wheel = next(dist.glob("zrpc-*.whl"))
    # A fresh venv; its dependencies come from this interpreter's site-packages (no download).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    vpy = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, timeout=120, capture_output=True)
    purelib = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, timeout=30).stdout.strip()
    Path(purelib, "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "ZRPC_", "VIRTUAL_ENV"))}
    env["ZRPC_HOME"] = str(tmp_path / "home")
    where = subprocess.run([str(vpy), "-c", "import zrpc, broker.web; print(zrpc.__file__)"], cwd=tmp_path,
                           env=env, check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    assert where.startswith(purelib), where  # the wheel's copy, not the checkout's
    installed_web = Path(purelib) / "zrpc" / "web"
    assert not (installed_web / "node_modules").exists() and not (installed_web / "test").exists()

    broker = Proc([str(venv / "bin" / "zrpc-broker"), "start", "--listen", "127.0.0.1:0", "--workers", "0",
                   "--shards", "1", "--web-port", "0"], env, tmp_path / "broker.log")
    broker.popen = subprocess.Popen(broker.argv, env=env, cwd=tmp_path, stdout=broker.log.open("ab"),
                                    stderr=subprocess.STDOUT, start_new_session=True)
    try:
        line = wait_for(lambda: re.search(r"chat page: (https://\S+)/", broker.output()), 60,
                        what=f"the chat page line; log:\n{broker.output()}")
        base = line.group(1)
        ctx = ssl.create_default_context(cafile=str(tmp_path / "home" / "tls" / "dev-ca.crt"))

        def get(path: str) -> bytes:
            with urllib.request.urlopen(base + path, context=ctx, timeout=20) as resp:
                assert resp.status == 200, path
                return bytes(resp.read())

        html = get("/").decode()
        assert html.encode() == (installed_web / "index.html").read_bytes()
        todo = [p for p in _page_links(html) if p.startswith("/") and not p.startswith("//")]
        assert "/chat.js" in todo and "/chat.css" in todo
        seen: set[str] = set()
        while todo:
            path = todo.pop()
            if path in seen:
                continue
            seen.add(path)
            body = get(path)
            assert body == (installed_web / path.lstrip("/")).read_bytes(), path
            if path.endswith((".js", ".mjs")):
                for spec in _imports(body.decode()):
                    assert spec.startswith(("/", "./", "../")), f"{path} imports bare {spec!r}"
                    todo.append(os.path.normpath(os.path.join(os.path.dirname(path), spec)))
        assert {"/chat.js", "/zrpc.js", "/vendor/msgpack.mjs", "/chat.css"} <= seen
    finally:
        broker.stop()
    assert "Traceback" not in broker.output()
