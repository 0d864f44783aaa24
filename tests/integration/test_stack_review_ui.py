"""The reviewer's part, done the way a reviewer does it: in the MLflow UI, in a browser.

Playwright drives Debian's headless Chromium (``make browser`` installs it; Playwright's
own browser download does not work on these machines). The reviewer opens the model,
finds the challenger, reads its validation report from the source run's artifacts, sets
``champion`` on it by clicking, and both serving replicas then answer with it.
Screenshots go to ``test-results/``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from onnxflow.stack.deployments import trigger
from onnxflow.endpoints import wait_until_serving
from tests.integration.conftest import RESULTS, SMALL_CONFIG, record_timing

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync",
                 "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api

    # make test installs it; a missing browser is a failure, never a silent skip
    assert CHROMIUM.exists(), f"{CHROMIUM} not installed: run `make system-packages`"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def pending_challenger(stack, client) -> str:
    """The version a reviewer has to decide on: a challenger that is not champion yet.

    After the loop tests there is one (champion rolled back to v1, challenger v2); run
    alone, this test makes it with one or two runs on the worker.
    """
    def alias(name):
        try:
            return client.get_model_version_by_alias("digits", name).version
        except Exception:
            return None

    for mode, seed in (("auto", 1), ("review", 2)):
        champion, challenger = alias("champion"), alias("challenger")
        if champion and challenger and champion != challenger:
            return challenger
        if mode == "auto" and champion:
            continue
        config = {**SMALL_CONFIG, "train": {**SMALL_CONFIG["train"], "seed": seed},
                  "promote": {"mode": mode}}
        run = trigger(stack, {"frameworks": ["torch"], "config": config,
                              "endpoints": stack.endpoint_urls}, wait=True, timeout_s=300)
        assert run.state.is_completed(), run.state
    champion, challenger = alias("champion"), alias("challenger")
    assert champion and challenger and champion != challenger, (champion, challenger)
    return challenger


def test_reviewer_reads_the_report_and_promotes_the_challenger_in_the_mlflow_ui(
    stack, mlflow_client, browser,
):
    version = pending_challenger(stack, mlflow_client)
    champion_before = mlflow_client.get_model_version_by_alias("digits", "champion").version
    RESULTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(30_000)
    try:
        # The model's page: the challenger is the row tagged "@ challenger".
        page.goto(f"{stack.mlflow_url}/#/models/digits", wait_until="load")
        row = page.get_by_role("row").filter(has_text="@ challenger")
        row.get_by_role("link", name=f"Version {version}").click()
        page.wait_for_url(f"**/#/models/digits/versions/{version}")
        version_url = page.url
        page.get_by_text("awaiting_review").first.wait_for()
        page.get_by_role("cell", name="validation", exact=True).wait_for()

        # Its validation report, from the source run's artifacts.
        page.locator("[data-testid=descriptions-item-content] a[href*='/runs/']").click()
        page.get_by_role("tab", name="Artifacts").click()
        page.get_by_text("validation", exact=True).first.click()
        page.get_by_text("report.md", exact=True).first.click()
        page.get_by_text("Validation report: PASSED").wait_for()
        page.screenshot(path=str(RESULTS / f"reviewer-report-v{version}.png"))

        # Back on the version page: add the champion alias and save.
        page.goto(version_url, wait_until="load")
        page.get_by_title("Edit aliases").click()
        dialog = page.get_by_role("dialog")
        combobox = dialog.get_by_role("combobox")
        combobox.click()
        combobox.press_sequentially("champion")
        combobox.press("Enter")
        dialog.get_by_text(f"also being used on version {champion_before}").wait_for()
        dialog.get_by_role("button", name="Save aliases").click()
        clicked = time.monotonic()
        dialog.wait_for(state="hidden")
        page.get_by_text("@ champion").first.wait_for()
        page.screenshot(path=str(RESULTS / f"reviewer-promoted-v{version}.png"), full_page=True)
    except Exception:
        page.screenshot(path=str(RESULTS / "reviewer-failure.png"), full_page=True)
        raise
    finally:
        page.close()

    assert mlflow_client.get_model_version_by_alias("digits", "champion").version == version
    wait_until_serving(stack.endpoint_urls, "digits", version, timeout_s=30)
    record_timing("ui_promotion_to_both_replicas_serving_s", time.monotonic() - clicked)
