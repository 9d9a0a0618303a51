"""edged.topics: what may be one topic level, a prefix, a publish topic name and a filter (MQTT 5 4.7)."""
from __future__ import annotations

import pytest

from edged import topics


@pytest.mark.parametrize("level", ["cam1", "pi-4_b.1", "kitchen cam", "ünï", "$x", "x" * 128])
def test_level_problem_valid_levels_accepted(level):
    assert topics.level_problem(level) is None


@pytest.mark.parametrize("level, words", [("", "empty"), ("a/b", "one topic level"), ("a+", "'+'"), ("#", "'#'"),
                                          ("a\0", "NUL"), ("a\x7f", "control"), ("a\x85", "control"),
                                          ("a\ud800", "surrogate"), ("x" * 129, "128 bytes"), ("é" * 65, "128 bytes")])
def test_level_problem_invalid_levels_refused(level, words):
    why = topics.level_problem(level)
    assert why is not None and words in why, why


@pytest.mark.parametrize("prefix", ["edged/cam1", "edged/cam1/", "a", "site/a b/c"])
def test_prefix_problem_valid_prefixes_accepted(prefix):
    assert topics.prefix_problem(prefix) is None


@pytest.mark.parametrize("prefix, words", [("", "empty"), ("///", "empty"), ("/a", "start with '/'"),
                                           ("a//b", "empty topic level"), ("$SYS/a", "'$'"), ("a/+/b", "'+'"),
                                           ("a/#", "'#'"), ("a\tb", "control"), ("x" * 513, "512 bytes")])
def test_prefix_problem_invalid_prefixes_refused(prefix, words):
    why = topics.prefix_problem(prefix)
    assert why is not None and words in why, why


@pytest.mark.parametrize("name, ok", [("a/b", True), ("/a//b/", True), ("$x/y", True), ("", False), ("a/+", False),
                                      ("a/#", False), ("a\0b", False), ("x" * 65536, False)])
def test_name_problem_publish_topic_names(name, ok):
    assert (topics.name_problem(name) is None) is ok


@pytest.mark.parametrize("flt, ok", [("#", True), ("+", True), ("a/+/b", True), ("a/#", True), ("+/+/#", True),
                                     ("a/b#", False), ("a/#/b", False), ("a+/b", False), ("", False), ("a\0", False)])
def test_filter_problem_subscription_filters(flt, ok):
    assert (topics.filter_problem(flt) is None) is ok
