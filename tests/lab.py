"""Drive JupyterLab in headless Chromium the way a person does: open a notebook, run it, operate its widgets.

Used by ``tests/test_browser.py`` (marker ``browser``). The server runs on 127.0.0.1 with a random token, on a
copy of ``notebooks/`` (JupyterLab autosaves: the repository's notebooks are never written), with its own
settings directory (no news prompt, every cell kept in the page). The browser is Debian's ``chromium`` driven
through ``chromium-driver`` by Selenium; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# Notebooks the browser tests run whole in JupyterLab; in a session that runs them, nbval does not run them again.
BROWSER_NOTEBOOKS = ("01_pruning", "02_clients", "03_aggregation", "05_studio")
INSTALL = "apt-get install -y chromium chromium-driver   (as root; then pip install selenium)"

# The settings a clean workbench opens with: no news or update toasts over the notebook (the same overrides as
# `make lab`), and, for the test only, every cell attached to the page so a test can find any cell.
APP_SETTINGS = Path(__file__).resolve().parent.parent / "configs" / "jupyterlab"  # `make lab` opens with these
USER_SETTINGS = {"@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"}}


def browser_missing() -> str | None:
    """Why no browser test can run here (no chromium, no driver, no selenium), or ``None``."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return f"selenium is not installed: {INSTALL}"
    for exe in ("chromium", "chromedriver"):
        if shutil.which(exe) is None:
            return f"{exe} is not on PATH: {INSTALL}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """A JupyterLab server on a copy of the notebooks, and a headless Chromium looking at it."""

    def __init__(self, notebooks: Path, root: Path, shots: Path, width: int = 1400, height: int = 1000):
        self.root, self.shots = root, shots
        self.dir = root / "notebooks"
        shutil.copytree(notebooks, self.dir, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        settings = root / "lab-settings"
        for rel, value in USER_SETTINGS.items():
            path = settings / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        self.token, self.port = secrets.token_hex(16), _free_port()
        env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(root / "ws"),
               "LEGOKIT_PROGRESS": "0", "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "TRANSFORMERS_VERBOSITY": "error",
               # Headless servers and CI images often set a non-interactive backend; every notebook must draw under it.
               "MPLBACKEND": "Agg"}
        self.log = open(root / "jupyterlab.log", "w")  # noqa: SIM115 (closed in close())
        self.server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
             f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.dir}",
             f"--LabApp.app_settings_dir={APP_SETTINGS}",
             *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.dir)
        self._wait_server()
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        opts = webdriver.ChromeOptions()
        opts.binary_location = shutil.which("chromium")
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    f"--window-size={width},{height}", "--force-device-scale-factor=1"):
            opts.add_argument(arg)
        self.driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
        self.shot_count = 0

    def _wait_server(self, timeout: float = 90) -> None:
        url = f"http://127.0.0.1:{self.port}/api/status?token={self.token}"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"JupyterLab exited ({self.server.returncode}); see {self.log.name}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"JupyterLab did not answer within {timeout:.0f} s; see {self.log.name}")

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            self.server.terminate()
            try:
                self.server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.server.kill()
            self.log.close()

    # ------------------------------------------------------------------ page helpers

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, predicate, timeout: float, what: str, poll: float = 0.5):
        """Poll ``predicate()`` until it is truthy; fail with ``what`` and a screenshot after ``timeout`` s."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(poll)
        shot = self.screenshot("timeout")
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (screenshot {shot})")

    def screenshot(self, name: str) -> Path:
        self.shots.mkdir(parents=True, exist_ok=True)
        self.shot_count += 1
        path = self.shots / f"{self.shot_count:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def element_shot(self, css: str, path: Path) -> Path:
        """A picture of one element (for the README's notebook table)."""
        el = self.driver.find_element("css selector", css)
        self.js("arguments[0].scrollIntoView({block: 'start'})", el)
        time.sleep(0.3)
        path.parent.mkdir(parents=True, exist_ok=True)
        el.screenshot(str(path))
        return path

    # ------------------------------------------------------------------ notebooks

    def open(self, notebook: str, timeout: float = 120) -> None:
        """Open a notebook and wait for its kernel to be idle."""
        self.driver.get(f"http://127.0.0.1:{self.port}/lab/tree/{notebook}?token={self.token}")
        self.wait(lambda: self.js("return document.querySelectorAll('.jp-Notebook .jp-Cell').length") > 0,
                  timeout, f"{notebook} to show its cells")
        self.wait(lambda: self.kernel_status() == "idle", timeout, f"{notebook}'s kernel to start")
        self.notebook = notebook
        # the notebook gets the whole width: clicking the open side panel's tab collapses it
        from selenium.webdriver.common.by import By

        for tab in self.driver.find_elements(By.CSS_SELECTOR, ".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current"):
            tab.click()

    def kernel_status(self) -> str | None:
        """The kernel's state as the status bar shows it (``idle``, ``busy``, ``initializing``, ...)."""
        text = self.js("return [...document.querySelectorAll('#jp-main-statusbar .jp-StatusBar-TextItem')]"
                       ".map(e => e.textContent).join(' ')")
        for part in text.split("|")[1:]:
            word = part.strip().split(" ")[0].lower()
            if word:
                return word
        return None

    def command(self, menu: str, label: str) -> None:
        """Pick an entry of JupyterLab's menu bar by its labels (``command("Run", "Run All Cells")``)."""
        from selenium.webdriver.common.by import By

        bar = [m for m in self.driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item") if m.text.strip() == menu]
        assert bar, f"no {menu!r} menu in JupyterLab's menu bar"
        bar[0].click()

        def entry():
            return [e for e in self.driver.find_elements(By.CSS_SELECTOR, ".lm-Menu-item")
                    if e.find_elements(By.CSS_SELECTOR, ".lm-Menu-itemLabel")
                    and e.find_element(By.CSS_SELECTOR, ".lm-Menu-itemLabel").text.strip() == label]

        self.wait(entry, 10, f"menu entry {menu} > {label}")[0].click()

    def prompts(self) -> list[str]:
        """Every code cell's input prompt text: ``[ ]:`` not run, ``[*]:`` running, ``[7]:`` done."""
        return self.js("return [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')].map(e => e.textContent)")

    def run_all(self, timeout: float) -> float:
        """Run All Cells and wait until every code cell has run; returns the seconds it took.

        An error stops a JupyterLab Run All: the cells after it keep an empty prompt, and the error's traceback is
        reported (the failing cell's output) instead of a timeout.
        """
        started = time.time()
        self.command("Run", "Run All Cells")
        self.wait(lambda: any("*" in p for p in self.prompts()) or self.kernel_status() == "busy", 30,
                  "Run All to start")

        def finished():
            errors = self.error_outputs()
            if errors:
                shot = self.screenshot("error")
                raise AssertionError(f"{self.notebook} raised in the browser (screenshot {shot}):\n{errors[0]}")
            prompts = self.prompts()
            return self.kernel_status() == "idle" and prompts and all(p.strip("[]: ").isdigit() for p in prompts)

        self.wait(finished, timeout, f"{self.notebook} to run all its cells", poll=1.0)
        return time.time() - started

    def save(self, timeout: float = 60) -> dict:
        """Save the open notebook through JupyterLab (File > Save) and return it as written to disk (JSON)."""
        path = self.dir / self.notebook
        before = path.stat().st_mtime_ns
        self.command("File", "Save Notebook")
        self.wait(lambda: path.stat().st_mtime_ns != before, timeout, f"{self.notebook} to be saved")
        time.sleep(0.5)  # the server writes the file in one go; let a slow disk finish
        return json.loads(path.read_text())

    def error_outputs(self) -> list[str]:
        return self.js("return [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type="
                       "\"application/vnd.jupyter.stderr\"]')].map(e => e.textContent)"
                       ".filter(t => t.includes('Traceback') || /Error[:(]/.test(t.split('\\n')[0]))")

    def count(self, css: str) -> int:
        return self.js("return document.querySelectorAll(arguments[0]).length", css)

    # ------------------------------------------------------------------ widgets

    def widget(self, kind: str, index: int = 0):
        """The ``index``-th legokit widget of ``kind`` (its box has CSS class ``legokit-<kind>``), scrolled in view."""
        from selenium.webdriver.common.by import By

        boxes = self.wait(lambda: self.driver.find_elements(By.CSS_SELECTOR, f".legokit-{kind}"), 60,
                          f"the {kind} widget to render")
        box = boxes[index]
        self.js("arguments[0].scrollIntoView({block: 'center'})", box)
        return box

    def picture(self, box) -> str:
        """A fingerprint of what the widget shows: its pictures' sources (PNG data) and its tables' text."""
        return self.js("const b = arguments[0]; return [...b.querySelectorAll('img')].map(i => i.src).join('|') + "
                       "'#' + [...b.querySelectorAll('table')].map(t => t.innerText).join('|')", box)

    def status(self, box, css: str = ".legokit-status") -> str:
        """The text of the widget's status line."""
        return self.js("const s = arguments[0].querySelector(arguments[1]); return s ? s.innerText : ''", box, css)

    def set_text_value(self, box, label: str, value) -> None:
        """Type ``value`` into a slider's readout (or a number box) whose description starts with ``label``, then
        Enter (the first such control in ``box``)."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        for control in box.find_elements(By.CSS_SELECTOR, ".widget-inline-hbox"):
            labels = control.find_elements(By.CSS_SELECTOR, ".widget-label")
            if labels and labels[0].text.strip().startswith(label):
                field = (control.find_elements(By.CSS_SELECTOR, ".widget-readout")
                         or control.find_elements(By.CSS_SELECTOR, "input"))[0]
                field.click()
                field.send_keys(Keys.CONTROL, "a")
                field.send_keys(str(value), Keys.ENTER)
                return
        raise AssertionError(f"no control labelled {label!r} in the widget")

    def select(self, box, label: str, option: str | int) -> None:
        """Pick ``option`` (its text, or an index) in the first dropdown whose description starts with ``label``."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        for control in box.find_elements(By.CSS_SELECTOR, ".widget-dropdown"):
            labels = control.find_elements(By.CSS_SELECTOR, ".widget-label")
            if labels and labels[0].text.strip().startswith(label):
                sel = Select(control.find_element(By.TAG_NAME, "select"))
                if isinstance(option, int):
                    sel.select_by_index(option)
                else:
                    sel.select_by_visible_text(option)
                return
        raise AssertionError(f"no dropdown labelled {label!r} in the widget")

    def click(self, box, css: str) -> None:
        from selenium.webdriver.common.by import By

        el = box.find_element(By.CSS_SELECTOR, css)
        self.js("arguments[0].scrollIntoView({block: 'center'})", el)
        el.click()

    def changed(self, box, before: str, timeout: float, what: str) -> str:
        """Wait until the widget's picture differs from ``before``; returns the new fingerprint."""
        def new():
            now = self.picture(box)
            return now if now != before else None

        return self.wait(new, timeout, what)
