"""ops.window_diff: what a recomputed window changes on the output, figure by figure."""

from __future__ import annotations

import json

from ops.window_diff import CHANGED, MAX_SHOWN, NEW, SAME, compare

WINDOW = {
    "schema_version": 1,
    "window_start": "2026-11-25T19:00:00Z",
    "window_end": "2026-11-25T19:00:30Z",
    "message_count": 1234,
    "device_counts": {"android": 700, "iOS": 534},
    "locale_counts": {"TX": 100, "RU": 90},
    "unique_device_count": 1190,
    "app_version_by_device": {"android": {"2.3.0": 650, "2.2.1": 50}, "iOS": {"2.3.0": 534}},
    "unique_ip_count": 1100,
    "top_ips": [{"ip": "10.0.0.1", "count": 12}, {"ip": "10.0.0.2", "count": 9}],
    "missing_field_counts": {"locale": 1044},
    "invalid_message_count": 1,
    "late_message_count": 0,
}


def value(**changes) -> bytes:
    return json.dumps(WINDOW | changes).encode()


def test_a_window_not_on_the_output_is_new_and_equal_bytes_are_the_same():
    assert compare(None, value()).verdict == NEW
    assert compare(value(), value()).verdict == SAME
    assert compare(value(), value()).describe() == ["same (the output holds these bytes already)"]


def test_a_changed_window_names_each_figure_that_differs_with_both_values():
    recomputed = value(
        message_count=1240,
        device_counts={"android": 706, "iOS": 534},
        app_version_by_device={"android": {"2.3.0": 656, "2.2.1": 50}, "iOS": {"2.3.0": 534}},
        top_ips=[{"ip": "10.0.0.1", "count": 12}, {"ip": "10.0.0.2", "count": 9}, {"ip": "10.0.0.3", "count": 7}],
        missing_field_counts={},
        locale_counts={"TX": 100, "RU": 90, "DE": 1044},
    )
    change = compare(value(), recomputed)
    assert change.verdict == CHANGED
    assert change.differences == [
        "message_count: 1234 -> 1240",
        "device_counts[android]: 700 -> 706",
        "locale_counts[DE]: 0 -> 1044",
        "app_version_by_device[android][2.3.0]: 650 -> 656",
        "top_ips: [10.0.0.1 12, 10.0.0.2 9] -> [10.0.0.1 12, 10.0.0.2 9, 10.0.0.3 7]",
        "missing_field_counts[locale]: 1044 -> 0",
    ]
    assert change.describe()[0] == "changed (6 figure(s))"
    assert change.describe()[1] == "    message_count: 1234 -> 1240"


def test_many_differences_are_summarised():
    recomputed = value(locale_counts={f"L{i}": i + 1 for i in range(MAX_SHOWN + 5)})
    lines = compare(value(), recomputed).describe()
    assert len(lines) == 1 + MAX_SHOWN + 1 and lines[-1] == "    ... and 7 more"


def test_the_same_figures_in_other_bytes_say_so():
    reordered = json.dumps(dict(reversed(list(WINDOW.items())))).encode()
    assert compare(value(), reordered).differences == ["the bytes only (the same figures, written differently)"]


def test_a_value_that_is_not_a_json_object_is_changed_without_figures():
    assert compare(b"junk", value()).differences == ["the value (not a JSON object on one side)"]
