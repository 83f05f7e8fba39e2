"""lora_course.procs: a course module in a fresh process, its JSON lines back; a failing child's error says what."""
import socket

import pytest

from lora_course.procs import free_port, run_module


def test_run_module_returns_the_json_lines_with_the_prefix(tmp_path):
    rows = run_module("json.tool", ["--json-lines", "--compact", str(_lines(tmp_path, '{"a": 1}', '{"b": 2}'))],
                      what="json.tool", timeout=60)
    assert rows == [{"a": 1}, {"b": 2}]
    assert run_module("json.tool", ["--json-lines", "--compact", str(_lines(tmp_path, '{"a": 1}', '{"b": 2}'))],
                      what="json.tool", timeout=60, prefix='{"b"') == [{"b": 2}]


def test_a_failing_or_silent_child_raises_naming_what_and_its_exit_code(tmp_path):
    class Boom(Exception):
        pass

    with pytest.raises(Boom, match=r"the check failed \(exit [1-9]"):
        run_module("json.tool", [str(tmp_path / "missing.json")], what="the check", timeout=60, error=Boom)
    with pytest.raises(RuntimeError, match=r"counting failed \(exit 0, 2 of 3 results\)"):
        run_module("json.tool", ["--json-lines", "--compact", str(_lines(tmp_path, '{"a": 1}', '{"b": 2}'))],
                   what="counting", timeout=60, expect=3)


def test_free_port_can_be_bound():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def _lines(tmp_path, *lines):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
