"""``onnxflow feedback NAME FILE.csv``: ground truth from a CSV file to an endpoint.

The CSV has a header with ``request_id`` and ``label`` (and optionally ``row``). Labels that
read as integers are sent as integers, other numbers as numbers, the rest as text; the
endpoint checks them against the model and stores all of them or none
(:mod:`onnxflow.serving.feedback`).
"""

from __future__ import annotations

import csv
from pathlib import Path

from onnxflow.errors import OnnxflowError, answered_error


class FeedbackError(OnnxflowError):
    """The labels could not be read or were refused by the endpoint."""


def read_labels_csv(path: Path) -> list[dict]:
    """The labels of ``path`` as the feedback route takes them; a clear error otherwise."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = {"request_id", "label"} - set(reader.fieldnames or ())
            if missing:
                raise FeedbackError(
                    f"{path}: the header must name request_id and label (and optionally "
                    f"row); missing {', '.join(sorted(missing))}"
                )
            labels = []
            for line, record in enumerate(reader, start=2):
                item = {"request_id": record["request_id"], "label": _value(record["label"])}
                if record.get("row") not in (None, ""):
                    if not record["row"].isdigit():
                        raise FeedbackError(f"{path}:{line}: row {record['row']!r} is no index")
                    item["row"] = int(record["row"])
                labels.append(item)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FeedbackError(f"cannot read {path}: {exc}") from None
    if not labels:
        raise FeedbackError(f"{path} has no labels")
    return labels


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def send_feedback(url: str, model: str, labels: list[dict], token: str | None = None) -> int:
    """POST the labels to ``URL/v2/models/MODEL/feedback``; the number stored."""
    import httpx

    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(
            f"{url.rstrip('/')}/v2/models/{model}/feedback",
            json={"labels": labels},
            headers=headers,
            timeout=120,
        )
    except httpx.HTTPError as exc:
        raise FeedbackError(f"cannot reach the endpoint at {url}: {exc}") from None
    if response.status_code != 200:
        raise FeedbackError(
            f"the endpoint refused the labels ({response.status_code}): {answered_error(response)}"
        )
    return response.json()["stored"]
