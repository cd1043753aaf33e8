"""The web page in a real headless Chromium (Debian's `chromium` + `chromium-driver`, installed by .ci/run):
type a query, see the grid, open a detail, search by image, and check the screenshot shows the results."""

import io
import os
import shutil

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no chromium/chromedriver binary (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def test_search_details_and_image_search_in_a_browser(browser, live, collection, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(live.url + "/")
    box = browser.find_element(By.ID, "q")
    assert browser.switch_to.active_element == box  # the search box has the focus: type at once
    box.send_keys("a red square + 2:blue", Keys.ENTER)
    cards = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#results .card"))
    assert len(cards) == 24
    loaded = "return arguments[0].complete && arguments[0].naturalWidth > 0"  # lazy: the first row loads now
    wait_for(
        browser,
        lambda d: all(d.execute_script(loaded, c.find_element(By.TAG_NAME, "img")) for c in cards[:4]),
    )
    assert "results for" in browser.find_element(By.ID, "status").text
    assert all(c.find_element(By.CLASS_NAME, "score").text.startswith("score ") for c in cards)

    # the keyboard alone: the first card has the focus, an arrow moves, Enter opens its details
    browser.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
    focused = browser.switch_to.active_element
    assert focused.get_attribute("data-id") == cards[1].get_attribute("data-id")
    focused.send_keys(Keys.ENTER)
    neighbours = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#neighbours .card"))
    assert len(neighbours) == 8
    path = browser.find_element(By.CSS_SELECTOR, "#details .fact-path").text
    assert path.startswith(str(collection.folder))
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    assert not browser.find_element(By.ID, "details").is_displayed()

    # search by an uploaded image: the image itself comes first
    target = collection.paths[5]
    upload = tmp_path / "query.png"
    Image.open(target).save(upload)
    box.clear()
    browser.find_element(By.ID, "file").send_keys(str(upload))
    wait_for(browser, lambda d: "results for image" in d.find_element(By.ID, "status").text)
    first = browser.find_element(By.CSS_SELECTOR, "#results .card")
    assert first.find_element(By.CLASS_NAME, "name").text == target.rsplit("/", 1)[1]
    assert first.find_element(By.CLASS_NAME, "score").text == "score 1.0000"

    # the screenshot shows a grid of results: many distinct thumbnails, not a blank page
    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    if os.environ.get("RETRIEVAL_SCREENSHOT"):
        shot.save(os.environ["RETRIEVAL_SCREENSHOT"])
    grid = browser.find_element(By.ID, "results").rect
    scale = shot.width / browser.execute_script("return window.innerWidth")
    box_px = [
        int(v * scale)
        for v in (grid["x"], grid["y"], grid["x"] + grid["width"], min(grid["y"] + grid["height"], 900))
    ]
    colours = shot.crop(box_px).resize((64, 64)).getcolors(64 * 64)
    assert colours is not None and len(colours) > 20
