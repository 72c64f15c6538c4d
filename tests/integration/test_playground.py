"""The playground at ``/``: its files as served, and the page itself in a real headless Chromium
against a real loopback server on the scripted engine (forced outputs), checking what it draws
as detections stream in, the threshold, the visual-prompt boxes, keypoints, errors, API keys,
the curl command it offers, and that it never requests anything from another host.

Screenshot for the docs: ``UPDATE_SCREENSHOT=1 pytest tests/integration/test_playground.py``
writes ``docs/playground.png``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from rexomni_server import app as app_module
from rexomni_server.app import create_app
from rexomni_server.engines.scripted import ScriptedEngine
from rexomni_server.playground import ASSETS, PLAYGROUND_PATHS, playground_router
from rexomni_server.runtime import Runtime
from rexomni_server.settings import Settings
from tests.support import image_bytes, required_program

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "server" / "rexomni_server" / "static" / "playground"
W, H = 640, 480
BACKGROUND = (30, 120, 200)  # image_bytes' colour
TIMEOUT_S = 30.0  # every wait of a browser test: a hang guard, not a timing

# Two person boxes and a car box, scored 0.9, 0.2 and 0.6 (one log-probability per coordinate).
DETECTION_OUTPUT = (
    "<|object_ref_start|>person<|object_ref_end|><|box_start|><100><100><400><600>, <500><200><700><500><|box_end|>"
    "<|object_ref_start|>car<|object_ref_end|><|box_start|><600><600><900><900><|box_end|>"
)
DETECTION_LOGPROBS = [math.log(0.9)] * 4 + [math.log(0.2)] * 4 + [math.log(0.6)] * 4
SCORES = [0.9, 0.2, 0.6]
KEYPOINT_OUTPUT = json.dumps(
    {
        "person1": {
            "bbox": " <300> <100> <700> <950> ",
            "keypoints": {
                "nose": " <500> <180> ",
                "left eye": " <520> <160> ",
                "right eye": " <480> <160> ",
                "left ear": "unvisible",
                "right ear": "unvisible",
                "left shoulder": " <600> <330> ",
                "right shoulder": " <400> <330> ",
                "left elbow": " <640> <480> ",
                "right elbow": " <360> <480> ",
                "left wrist": " <660> <620> ",
                "right wrist": " <340> <620> ",
                "left hip": " <560> <620> ",
                "right hip": " <440> <620> ",
                "left knee": " <570> <780> ",
                "right knee": " <430> <780> ",
                "left ankle": " <580> <930> ",
                "right ankle": " <420> <930> ",
            },
        }
    }
)
POINT_OUTPUT = "<|object_ref_start|>cup<|object_ref_end|><|box_start|><500><500><|box_end|>"
SIMILAR_OUTPUT = "<|object_ref_start|>object<|object_ref_end|><|box_start|><10><10><20><20><|box_end|>"
POLYGON_OUTPUT = (
    "<|object_ref_start|>hello<|object_ref_end|><|box_start|><100><600><400><620><380><750><120><700><|box_end|>"
)


# ---- the files, as served ---------------------------------------------------------------------
def playground_app(**settings: Any) -> Any:
    app = create_app(runtime=Runtime(Settings(**settings), engine=ScriptedEngine(), model_label="scripted"))
    if not serves_playground(app):  # until the app includes it
        app.include_router(playground_router())
    return app


def serves_playground(app: Any) -> bool:
    return any(getattr(route, "path", None) == "/" for route in app.routes)


@pytest.fixture
def open_playground(monkeypatch: pytest.MonkeyPatch) -> None:
    """Until the app itself serves the playground, its paths are opened here as the app will
    open them; once it does, the app's own open paths are what the tests check."""
    app = create_app(runtime=Runtime(Settings(), engine=ScriptedEngine(), model_label="scripted"))
    if not serves_playground(app):
        monkeypatch.setattr(app_module, "OPEN_PATHS", app_module.OPEN_PATHS | PLAYGROUND_PATHS)


async def test_the_page_and_its_assets_are_served_with_a_strict_policy(open_playground: None) -> None:
    app = playground_app(api_keys="sekret")  # the page itself needs no key
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        page = await client.get("/")
        assert page.status_code == 200, page.text
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.text == (STATIC / "index.html").read_text()
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        for name, media_type in ASSETS.items():
            asset = await client.get(f"/playground/{name}")
            assert asset.status_code == 200, name
            assert asset.headers["content-type"] == media_type
            assert asset.content == (STATIC / name).read_bytes()
            assert f'"playground/{name}"' in page.text  # relative: works under a proxy's prefix too
        missing = await client.get("/playground/nothing.js")
        assert missing.status_code in (401, 404)  # not served: closed like any unknown path
        # The API stays closed; the page is not in the API's description.
        assert (await client.post("/v1/detect/stream", json={})).status_code == 401
        assert "/" not in (await client.get("/openapi.json")).json()["paths"]


def test_the_page_refers_to_nothing_outside_the_server() -> None:
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|\burl\(\s*['\"]?(?!data:)", text), path.name


def test_the_static_files_are_package_data() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["rexomni_server"]
    for path in STATIC.iterdir():
        relative = path.relative_to(REPO / "server" / "rexomni_server").as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative


# ---- a real server and a real browser ---------------------------------------------------------
@contextlib.contextmanager
def live_server(engine: ScriptedEngine, **settings: Any) -> Iterator[str]:
    """The app (playground included) on uvicorn on a free loopback port, in a thread; stopped
    afterwards. Yields its base URL."""
    asyncio.run(engine.start())
    runtime = Runtime(Settings(allow_forced_output=True, **settings), engine=engine, model_label="scripted")
    app = create_app(runtime=runtime, manage_runtime=False)
    if not serves_playground(app):
        app.include_router(playground_router())
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="playground-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("the server did not start")
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=TIMEOUT_S)
        if thread.is_alive():  # connections that would not close: cut them
            server.force_exit = True
            thread.join(timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium through chromedriver (both from the system: nothing is downloaded),
    with the DevTools performance log on, so every request a page makes can be listed."""
    chromium = required_program("chromium", "apt-get install chromium chromium-driver")
    chromedriver = required_program("chromedriver", "apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1360,1000",
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
        "--disable-extensions",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        driver.set_page_load_timeout(TIMEOUT_S)
        driver.set_script_timeout(TIMEOUT_S)
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(image_bytes(W, H))
    return path


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, TIMEOUT_S, poll_frequency=0.05).until(condition, message=f"waiting for {what}")


def requested_urls(driver: Any) -> list[str]:
    """Every URL the page asked for since the last call (DevTools' Network.requestWillBeSent)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def assert_all_local(urls: list[str], base: str) -> None:
    assert urls, "no request was logged"
    outside = [u[:80] for u in urls if not (u.startswith(f"{base}/") or u.startswith(("data:", "blob:")))]
    assert not outside, f"the page made requests off this server: {outside}"


def assert_no_script_errors(driver: Any) -> None:
    """Nothing went wrong in the page's script or against its security policy (the 4xx answers
    the tests ask for are the console's "network" errors, and expected)."""
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and e.get("source") != "network"]
    assert not errors, errors


def open_page(driver: Any, base: str, image: Path | None) -> None:
    from selenium.webdriver.common.by import By

    requested_urls(driver)  # drop what earlier pages logged
    driver.get_log("browser")
    driver.get(f"{base}/")
    wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#task option")) == 8, "the tasks")
    assert not driver.find_element(By.ID, "error").is_displayed(), driver.find_element(By.ID, "error").text
    assert driver.find_element(By.ID, "task-description").text  # from GET /v1/tasks
    assert driver.find_element(By.ID, "status").text == "idle"
    if image is not None:
        driver.find_element(By.ID, "file").send_keys(str(image))
        wait_for(driver, lambda d: f"{W} × {H} px" in d.find_element(By.ID, "image-info").text, "the image")


def configure(
    driver: Any, task: str, categories: str = "", forced: str | None = None, keypoint_type: str | None = None
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "task")).select_by_value(task)
    field = driver.find_element(By.ID, "categories")
    if field.is_displayed():  # the task takes categories
        field.clear()
        field.send_keys(categories)
    if keypoint_type is not None:
        Select(driver.find_element(By.ID, "keypoint-type")).select_by_value(keypoint_type)
    # Forced outputs are a testing feature of the API, not of the page's form.
    driver.execute_script("window.playground.extraOptions = arguments[0];", {"forced_output": forced} if forced else {})


def run_and_wait(driver: Any) -> str:
    """Run, wait until it finishes; returns the final status (done, error)."""
    from selenium.webdriver.common.by import By

    runs = state(driver, "runs")
    driver.find_element(By.ID, "run").click()
    wait_for(
        driver,
        lambda d: state(d, "runs") > runs and not state(d, "running"),
        "the run",
    )
    status: str = driver.find_element(By.ID, "status").text
    return status


def state(driver: Any, name: str) -> Any:
    return driver.execute_script(f"return window.playground.{name};")


def pixel(driver: Any, x: float, y: float) -> tuple[int, int, int]:
    """The canvas's colour at image pixel (x, y)."""
    r, g, b, _ = driver.execute_script(
        """const [x, y] = window.playground.toCanvas(arguments[0], arguments[1]);
        const canvas = document.getElementById('canvas');
        return Array.from(canvas.getContext('2d').getImageData(Math.floor(x), Math.floor(y), 1, 1).data);""",
        x,
        y,
    )
    return r, g, b


def is_background(colour: tuple[int, int, int]) -> bool:
    return all(abs(c - b) <= 3 for c, b in zip(colour, BACKGROUND, strict=True))


def visible_items(driver: Any) -> list[Any]:
    from selenium.webdriver.common.by import By

    return [li for li in driver.find_elements(By.CSS_SELECTOR, "#detections li") if li.is_displayed()]


@pytest.mark.slow
def test_detections_are_drawn_as_they_stream_in(browser: Any, photo: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    # A token every 20 ms: about a second from the first box to the end of the answer.
    engine = ScriptedEngine(token_delay_s=0.02, coordinate_logprob=DETECTION_LOGPROBS)
    with live_server(engine) as base:
        open_page(browser, base, photo)
        configure(browser, "detection", "person, car", forced=DETECTION_OUTPUT)
        assert run_and_wait(browser) == "done", browser.find_element(By.ID, "error").text

        detections = state(browser, "detections")
        drawn = state(browser, "drawn")
        assert [(d["type"], d["label"]) for d in drawn] == [("box", "person"), ("box", "person"), ("box", "car")]
        assert [d["score"] for d in drawn] == pytest.approx(SCORES, abs=1e-6)
        # Drawn the moment each arrived, not when the answer was complete.
        done_at = next(e["at"] for e in state(browser, "events") if e["event"] == "done")
        first_at = next(e["at"] for e in state(browser, "events") if e["event"] == "detection")
        assert done_at - first_at > 200, state(browser, "events")

        items = browser.find_elements(By.CSS_SELECTOR, "#detections li")
        assert [li.get_attribute("data-label") for li in items] == ["person", "person", "car"]
        assert [li.get_attribute("data-type") for li in items] == ["box"] * 3
        assert "box [" in items[0].text and "0.900" in items[0].text
        swatches = [li.find_element(By.CLASS_NAME, "swatch").value_of_css_property("background-color") for li in items]
        assert swatches[0] == swatches[1] != swatches[2]  # a colour per label

        # The boxes are on the canvas, where the image's pixels say they are.
        for detection in detections:
            x0, y0, _, y1 = detection["box"]
            assert not is_background(pixel(browser, x0, (y0 + y1) / 2)), detection
        assert is_background(pixel(browser, 620, 20))  # nowhere near a detection

        result = json.loads(browser.find_element(By.ID, "raw").text)
        assert result["task"] == "detection" and len(result["detections"]) == 3
        assert result["image"]["width"] == W and result["detections"] == detections
        assert "3 detections" in browser.find_element(By.ID, "summary").text

        screenshot = tmp_path / "playground.png"
        size = browser.get_window_size()
        browser.set_window_size(1360, 1140)  # the list of detections too
        wait_for(browser, lambda d: d.execute_script("return window.innerHeight;") > 900, "the larger window")
        browser.save_screenshot(str(screenshot))
        browser.set_window_size(size["width"], size["height"])
        wait_for(browser, lambda d: d.execute_script("return window.innerHeight;") < 900, "the window")
        if os.environ.get("UPDATE_SCREENSHOT") == "1":
            (REPO / "docs").mkdir(exist_ok=True)
            shutil.copyfile(screenshot, REPO / "docs" / "playground.png")

        # The threshold hides what scored below it, on the canvas and in the list.
        browser.execute_script(
            """const slider = document.getElementById('threshold');
            slider.value = '0.5';
            slider.dispatchEvent(new Event('input', {bubbles: true}));"""
        )
        drawn = state(browser, "drawn")
        assert [d["score"] for d in drawn] == pytest.approx([0.9, 0.6], abs=1e-6)
        assert [li.get_attribute("data-label") for li in visible_items(browser)] == ["person", "car"]
        x0, y0, _, y1 = detections[1]["box"]
        assert is_background(pixel(browser, x0, (y0 + y1) / 2))  # the 0.2 box is gone
        assert "1 below the threshold" in browser.find_element(By.ID, "summary").text

        # The curl command is the same request, and it runs.
        curl = browser.find_element(By.ID, "curl").text
        assert f"{base}/v1/detect/stream" in curl and "base64 -w0 photo.png" in curl
        assert '"categories":["person","car"]' in curl and "Authorization" not in curl
        if shutil.which("curl") and shutil.which("base64") and shutil.which("bash"):
            answer = subprocess.run(
                ["bash", "-c", curl], cwd=photo.parent, capture_output=True, text=True, timeout=TIMEOUT_S, check=True
            ).stdout
            done = answer.split("event: done", 1)[1].split("data:", 1)[1].strip().splitlines()[0]
            assert json.loads(done)["detections"] == detections

        assert_all_local(requested_urls(browser), base)
        assert_no_script_errors(browser)


@pytest.mark.slow
def test_keypoints_polygons_and_visual_prompts(browser: Any, photo: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    with live_server(ScriptedEngine()) as base:
        open_page(browser, base, photo)
        assert browser.find_element(By.ID, "keypoint-field").is_displayed() is False
        configure(browser, "keypoint", "person", forced=KEYPOINT_OUTPUT, keypoint_type="person")
        assert browser.find_element(By.ID, "keypoint-field").is_displayed()
        assert run_and_wait(browser) == "done", browser.find_element(By.ID, "error").text
        (drawn,) = state(browser, "drawn")
        assert drawn["type"] == "keypoints" and drawn["score"] is None  # scores off: the engine gives none
        assert drawn["points"] == 15 and drawn["edges"] == 15  # COCO's 19 edges less the 4 to hidden ears
        (detection,) = state(browser, "detections")
        nose = detection["keypoints"]["nose"]
        assert not is_background(pixel(browser, *nose))
        assert "15 keypoints (2 hidden)" in browser.find_element(By.CSS_SELECTOR, "#detections li").text

        configure(browser, "ocr_polygon", "text line", forced=POLYGON_OUTPUT)
        assert run_and_wait(browser) == "done", browser.find_element(By.ID, "error").text
        assert [(d["type"], d["label"], d["vertices"]) for d in state(browser, "drawn")] == [("polygon", "hello", 4)]
        assert "polygon (4 points)" in browser.find_element(By.CSS_SELECTOR, "#detections li").text

        # Reference boxes drawn with the mouse, listed, removable, and sent.
        configure(browser, "visual_prompting", forced=SIMILAR_OUTPUT)
        assert browser.find_element(By.ID, "prompt-field").is_displayed()
        assert not browser.find_element(By.ID, "categories-field").is_displayed()
        canvas = browser.find_element(By.ID, "canvas")
        size = canvas.size
        for left, top in ((0.1, 0.1), (0.55, 0.5)):
            ActionChains(browser).move_to_element_with_offset(
                canvas, int(size["width"] * (left - 0.5)), int(size["height"] * (top - 0.5))
            ).click_and_hold().move_by_offset(int(size["width"] * 0.2), int(size["height"] * 0.25)).release().perform()
        boxes = state(browser, "promptBoxes")
        assert len(boxes) == 2 and len(browser.find_elements(By.CSS_SELECTOR, "#prompt-boxes li")) == 2
        assert boxes[0][0] == pytest.approx(0.1 * W, abs=3) and boxes[0][2] == pytest.approx(0.3 * W, abs=3)
        assert boxes[0][1] == pytest.approx(0.1 * H, abs=3) and boxes[0][3] == pytest.approx(0.35 * H, abs=3)
        browser.find_elements(By.CSS_SELECTOR, "#prompt-boxes li button")[0].click()
        assert state(browser, "promptBoxes") == boxes[1:]
        assert "visual_prompt_boxes" in browser.find_element(By.ID, "curl").text
        assert run_and_wait(browser) == "done", browser.find_element(By.ID, "error").text
        assert [d["type"] for d in state(browser, "drawn")] == ["box"]
        sent = json.loads(browser.find_element(By.ID, "raw").text)
        assert sent["task"] == "visual_prompting"

        assert_all_local(requested_urls(browser), base)
        assert_no_script_errors(browser)


@pytest.mark.slow
def test_tiling_is_offered_where_it_applies_and_sent(browser: Any, photo: Path) -> None:
    from selenium.webdriver.common.by import By

    with live_server(ScriptedEngine()) as base:
        open_page(browser, base, photo)
        configure(browser, "gui_grounding", "the OK button")
        assert not browser.find_element(By.ID, "tiling-field").is_displayed()  # a GUI task: refused there
        configure(browser, "detection", "person, car", forced=DETECTION_OUTPUT)
        # A small max_pixels, so this small photo is cut into tiles.
        browser.execute_script("window.playground.extraOptions.max_pixels = 100000;")
        browser.find_element(By.ID, "tiling").click()
        assert '"tiling":"auto"' in browser.find_element(By.ID, "curl").text
        assert run_and_wait(browser) == "done", browser.find_element(By.ID, "error").text
        result = json.loads(browser.find_element(By.ID, "raw").text)
        assert len(result["tiles"]) > 2 and result["tiles"][-1]["whole"]
        assert len(state(browser, "drawn")) == len(result["detections"]) > 0
        configure(browser, "gui_pointing", "the close icon")  # hidden again, and not sent
        assert '"tiling"' not in browser.find_element(By.ID, "curl").text
        assert_no_script_errors(browser)


@pytest.mark.slow
def test_errors_are_shown(browser: Any, photo: Path) -> None:
    from selenium.webdriver.common.by import By

    # A request stopped by its time budget after it was accepted: an `error` event mid-stream.
    engine = ScriptedEngine(token_delay_s=0.05)
    with live_server(engine, request_timeout_s=0.5) as base:
        open_page(browser, base, None)
        browser.find_element(By.ID, "run").click()  # no image yet
        assert "image first" in browser.find_element(By.ID, "error").text

        browser.find_element(By.ID, "file").send_keys(str(photo))
        wait_for(browser, lambda d: "photo.png" in d.find_element(By.ID, "image-info").text, "the image")
        configure(browser, "detection", "")  # no categories: refused with 422 before any event
        assert run_and_wait(browser) == "error"
        error = browser.find_element(By.ID, "error")
        assert error.is_displayed()
        assert "422 invalid_request" in error.text and "category" in error.text
        assert browser.find_elements(By.CSS_SELECTOR, "#detections li") == []

        configure(browser, "detection", "person", forced=DETECTION_OUTPUT)
        assert run_and_wait(browser) == "error"
        assert "504 timeout" in browser.find_element(By.ID, "error").text
        assert [e["event"] for e in state(browser, "events")][-1] == "error"

        assert_all_local(requested_urls(browser), base)
        assert_no_script_errors(browser)


@pytest.mark.slow
def test_the_api_key_is_sent_when_given(browser: Any, photo: Path, open_playground: None) -> None:
    from selenium.webdriver.common.by import By

    with live_server(ScriptedEngine(), api_keys="sekret") as base:
        open_page(browser, base, photo)  # the page and the task list need no key
        configure(browser, "pointing", "cup", forced=POINT_OUTPUT)
        assert run_and_wait(browser) == "error"
        assert "401 unauthenticated" in browser.find_element(By.ID, "error").text

        browser.find_element(By.ID, "api-key").send_keys("sekret")
        browser.find_element(By.ID, "remember-key").click()
        assert run_and_wait(browser) == "done", browser.find_element(By.ID, "error").text
        assert not browser.find_element(By.ID, "error").is_displayed()
        assert [(d["type"], d["label"]) for d in state(browser, "drawn")] == [("point", "cup")]
        assert "Authorization: Bearer $REXOMNI_API_KEY" in browser.find_element(By.ID, "curl").text

        browser.refresh()  # remembered in this browser
        wait_for(browser, lambda d: d.find_element(By.ID, "api-key").get_attribute("value") == "sekret", "the key")
        browser.find_element(By.ID, "remember-key").click()  # and forgotten
        assert browser.execute_script("return localStorage.length;") == 0

        assert_all_local(requested_urls(browser), base)
        assert_no_script_errors(browser)


# A file of an image made in the page, handed over as a drop or a paste would.
MAKE_IMAGE_FILE = """
    const [name, type, width, height] = arguments;
    let blob;
    if (type === 'image/svg+xml') {
      blob = new Blob([`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}">` +
        '<rect width="100%" height="100%" fill="#c33"/></svg>'], {type});
    } else {
      const canvas = document.createElement('canvas');
      canvas.width = width;
      canvas.height = height;
      blob = await new Promise((resolve) => canvas.toBlob(resolve, type));
    }
    const data = new DataTransfer();
    data.items.add(new File([blob], name, {type}));
"""
DROP = "document.getElementById('stage').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));"
PASTE = "document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true}));"


def hand_over(driver: Any, how: str, name: str, media_type: str, width: int, height: int) -> None:
    from selenium.webdriver.common.by import By

    driver.execute_script(MAKE_IMAGE_FILE + how, name, media_type, width, height)
    shown = f"{name.rsplit('.', 1)[0]}.{'png' if media_type == 'image/svg+xml' else name.rsplit('.', 1)[1]}"
    expected = f"{shown}: {width} × {height} px"
    wait_for(driver, lambda d: d.find_element(By.ID, "image-info").text == expected, f"{name} to be shown")


@pytest.mark.slow
def test_an_image_can_be_dropped_or_pasted(browser: Any) -> None:
    from selenium.webdriver.common.by import By

    with live_server(ScriptedEngine()) as base:
        open_page(browser, base, None)
        hand_over(browser, DROP, "dropped.png", "image/png", 320, 200)
        assert state(browser, "imageUri").startswith("data:image/png;base64,")
        hand_over(browser, PASTE, "pasted.jpg", "image/jpeg", 200, 100)
        assert state(browser, "imageUri").startswith("data:image/jpeg;base64,")
        hand_over(browser, DROP, "drawing.svg", "image/svg+xml", 120, 90)  # not read by the server:
        assert state(browser, "imageUri").startswith("data:image/png;base64,")  # sent as PNG
        configure(browser, "pointing", "cup", forced=POINT_OUTPUT)
        assert run_and_wait(browser) == "done", browser.find_element(By.ID, "error").text
        assert json.loads(browser.find_element(By.ID, "raw").text)["image"]["width"] == 120

        assert_all_local(requested_urls(browser), base)
        assert_no_script_errors(browser)
