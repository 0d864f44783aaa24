"""The reviewer's part, done the way a reviewer does it: in the MLflow UI, in a browser.

Playwright drives Debian's headless Chromium (``make system-packages`` installs it;
Playwright's own browser download does not work on these machines). Everyone logs in to
the MLflow UI with their own account (the stack runs MLflow with authentication and the
promotion policy). In file order:

1. a data scientist, who may edit the model, tries to set ``champion`` on the
   challenger: refused, and the dialog shows the rule;
2. the reviewer opens the model, finds the challenger, reads its validation report from
   the source run's artifacts, sets ``champion`` on it by clicking, and both serving
   replicas then answer with it;
3. the reviewer tries ``champion`` on a version a data scientist registered without
   ``validation: passed``: refused, the rule on screen, the replicas keep serving.

Every attempt is in the model's audit trail. Screenshots go to ``test-results/``.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from onnxflow.endpoints import serving_version, wait_until_serving
from onnxflow.stack import manager
from onnxflow.stack.audit import read_trail
from onnxflow.stack.deployments import trigger
from tests.integration.conftest import RESULTS, SMALL_CONFIG, add_data_scientist, record_timing

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api

    # make test installs it; a missing browser is a failure, never a silent skip
    assert CHROMIUM.exists(), f"{CHROMIUM} not installed: run `make system-packages`"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def logged_in(browser, stack, user: str, password: str | None = None, *, failure: str):
    """A page in a fresh browser context logged in to the MLflow UI as ``user``, closed
    after the block; a block that fails leaves ``RESULTS/<failure>-failure.png``."""
    password = password or manager.account_env(stack, user)["MLFLOW_TRACKING_PASSWORD"]
    RESULTS.mkdir(exist_ok=True)
    context = browser.new_context(
        viewport={"width": 1400, "height": 1000},
        http_credentials={"username": user, "password": password},
    )
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        yield page
    except Exception:
        page.screenshot(path=str(RESULTS / f"{failure}-failure.png"), full_page=True)
        raise
    finally:
        context.close()


def try_champion_in_ui(page, stack, version: str):
    """On the version's page: Edit aliases, add ``champion``, Save; returns the dialog."""
    page.goto(f"{stack.mlflow_url}/#/models/digits/versions/{version}", wait_until="load")
    # The pencil next to Aliases; a version without aliases shows "Add" there instead.
    edit = page.get_by_title("Edit aliases")
    page.get_by_text("Aliases:").first.wait_for()
    if edit.count() == 0:
        edit = page.get_by_role("button", name="Add", exact=True).first
    edit.click()
    dialog = page.get_by_role("dialog")
    combobox = dialog.get_by_role("combobox")
    combobox.click()
    combobox.press_sequentially("champion")
    combobox.press("Enter")
    dialog.get_by_role("button", name="Save aliases").click()
    return dialog


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
        config = {
            **SMALL_CONFIG,
            "train": {**SMALL_CONFIG["train"], "seed": seed},
            "promote": {"mode": mode},
        }
        # In a thread of its own: Playwright's sync API runs an event loop in this one, and
        # Prefect's run_deployment would then hand back a coroutine instead of running.
        with ThreadPoolExecutor(1) as pool:
            run = pool.submit(
                trigger,
                stack,
                {"frameworks": ["torch"], "config": config, "endpoints": stack.endpoint_urls},
                wait=True,
                timeout_s=300,
            ).result()
        assert run.state.is_completed(), run.state
    champion, challenger = alias("champion"), alias("challenger")
    assert champion and challenger and champion != challenger, (champion, challenger)
    return challenger


@pytest.fixture
def pending(stack, mlflow_client) -> tuple[str, str]:
    """(the challenger a reviewer has to decide on, the champion it would replace)."""
    version = pending_challenger(stack, mlflow_client)
    return version, mlflow_client.get_model_version_by_alias("digits", "champion").version


def test_a_data_scientist_is_refused_champion_in_the_mlflow_ui_with_the_rule_on_screen(
    stack, mlflow_client, browser, pending
):
    version, champion_before = pending
    name, password = add_data_scientist(stack)
    with logged_in(browser, stack, name, password, failure="auth-data-scientist") as page:
        dialog = try_champion_in_ui(page, stack, version)
        dialog.get_by_text("Promotion policy, rule 'reviewers'").wait_for()
        dialog.get_by_text(f"refused for '{name}'").wait_for()
        page.screenshot(path=str(RESULTS / "auth-data-scientist-refused.png"))
    assert mlflow_client.get_model_version_by_alias("digits", "champion").version == champion_before
    last = read_trail("digits", stack.mlflow_url)[-1]
    assert (last["user"], last["to_version"], last["decision"], last["rule"], last["via"]) == (
        name,
        version,
        "refused",
        "reviewers",
        "ui",
    )


def test_reviewer_reads_the_report_and_promotes_the_challenger_in_the_mlflow_ui(
    stack, mlflow_client, browser, pending
):
    version, champion_before = pending
    with logged_in(browser, stack, "reviewer", failure="reviewer") as page:
        # The model's page: the challenger is the row tagged "@ challenger".
        page.goto(f"{stack.mlflow_url}/#/models/digits", wait_until="load")
        row = page.get_by_role("row").filter(has_text="@ challenger")
        row.get_by_role("link", name=f"Version {version}").click()
        page.wait_for_url(f"**/#/models/digits/versions/{version}")
        version_url = page.url
        # The pipeline's decision (awaiting_review, or kept_champion when run alone and the
        # new version did not beat the champion) and the evidence, as tags.
        page.get_by_role("cell", name="promotion_decision", exact=True).wait_for()
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

    assert mlflow_client.get_model_version_by_alias("digits", "champion").version == version
    wait_until_serving(stack.endpoint_urls, "digits", version, timeout_s=30)
    record_timing("ui_promotion_to_both_replicas_serving_s", time.monotonic() - clicked)
    last = read_trail("digits", stack.mlflow_url)[-1]
    assert (last["user"], last["from_version"], last["to_version"], last["decision"]) == (
        "reviewer",
        champion_before,
        version,
        "allowed",
    )
    assert (
        mlflow_client.get_model_version("digits", version).tags["audit.champion_set_by"]
        == "reviewer"
    )


def test_reviewer_is_refused_a_version_without_validation_passed_in_the_mlflow_ui(
    stack,
    mlflow_client,
    browser,
):
    champion = mlflow_client.get_model_version_by_alias("digits", "champion")
    # A data scientist registers their own, unvalidated copy of a model as a new version
    # (evidence tags are the pipeline's to write: the data scientist may add none).
    name, password = add_data_scientist(stack)
    with httpx.Client(base_url=stack.mlflow_url, auth=(name, password), timeout=30) as http:
        created = http.post(
            "/api/2.0/mlflow/model-versions/create",
            json={
                "name": "digits",
                "source": f"models:/digits/{champion.version}",
            },
        )
    assert created.status_code == 200, created.text
    unvalidated = created.json()["model_version"]["version"]
    assert mlflow_client.get_model_version("digits", unvalidated).tags["registered_by"] == name

    with logged_in(browser, stack, "reviewer", failure="auth-reviewer") as page:
        dialog = try_champion_in_ui(page, stack, unvalidated)
        dialog.get_by_text("Promotion policy, rule 'evidence'").wait_for()
        dialog.get_by_text("no 'validation' tag", exact=False).wait_for()
        page.screenshot(path=str(RESULTS / "auth-reviewer-refused-unvalidated.png"))

    assert mlflow_client.get_model_version_by_alias("digits", "champion").version == (
        champion.version
    )
    for url in stack.endpoint_urls:
        assert serving_version(url, "digits") == champion.version
    last = read_trail("digits", stack.mlflow_url)[-1]
    assert (last["user"], last["to_version"], last["decision"], last["rule"]) == (
        "reviewer",
        unvalidated,
        "refused",
        "evidence",
    )
