"""Reading JSONL formats into chat messages, file:line errors, and `check_file` reports."""

import io
import json

import pytest

from tunelab.data import check_file, detect_format, read_chat_file, read_jsonl
from tunelab.errors import TunelabError


def write(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


U, A, S = "user", "assistant", "system"

FORMATS = [
    ("chat", {"messages": [{"role": U, "content": "2+2?"}, {"role": A, "content": "4"}]},
     [{"role": U, "content": "2+2?"}, {"role": A, "content": "4"}]),
    ("chat", {"messages": [{"role": S, "content": "Be brief."}, {"role": U, "content": "hi"},
                           {"role": A, "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]}]},
     [{"role": S, "content": "Be brief."}, {"role": U, "content": "hi"}, {"role": A, "content": "hello"}]),
    ("prompt-completion", {"prompt": "2+2?", "completion": "4", "id": 7},
     [{"role": U, "content": "2+2?"}, {"role": A, "content": "4"}]),
    ("prompt-completion", {"prompt": [{"role": S, "content": "sys"}, {"role": U, "content": "q"}],
                           "completion": [{"role": A, "content": "a"}]},
     [{"role": S, "content": "sys"}, {"role": U, "content": "q"}, {"role": A, "content": "a"}]),
    ("alpaca", {"instruction": "Add.", "input": "2 and 2", "output": "4"},
     [{"role": U, "content": "Add.\n\n2 and 2"}, {"role": A, "content": "4"}]),
    ("alpaca", {"instruction": "Say hi.", "input": "", "output": "hi", "system": "You are kind."},
     [{"role": S, "content": "You are kind."}, {"role": U, "content": "Say hi."}, {"role": A, "content": "hi"}]),
    ("sharegpt", {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "q1"},
                                    {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"},
                                    {"from": "gpt", "value": "a2"}]},
     [{"role": S, "content": "sys"}, {"role": U, "content": "q1"}, {"role": A, "content": "a1"},
      {"role": U, "content": "q2"}, {"role": A, "content": "a2"}]),
]


@pytest.mark.parametrize("fmt,row,messages", FORMATS)
def test_formats_normalise_to_messages(tmp_path, fmt, row, messages):
    path = write(tmp_path, [row, "", row])
    data = read_chat_file(path)
    assert data.format == fmt
    assert data.rows == [messages, messages]
    assert data.lines == [1, 3]  # the blank line still counts


def test_read_jsonl_bom_crlf_and_raw_line_separator(tmp_path):
    path = tmp_path / "d.jsonl"
    text = json.dumps({"prompt": "a\u2028b", "completion": "c"}, ensure_ascii=False)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode() + b"\r\n\r\n" + text.encode() + b"\r\n")
    assert [r["prompt"] for r in read_jsonl(path)] == ["a\u2028b", "a\u2028b"]
    assert read_chat_file(path).lines == [1, 3]


def error_of(path, fn=read_chat_file) -> str:
    with pytest.raises(TunelabError) as e:
        fn(path)
    return str(e.value)


def test_malformed_json_names_physical_line(tmp_path):
    good = {"prompt": "q", "completion": "a"}
    path = write(tmp_path, [good, good, "", good, good, good, '{"prompt": "q", "completion": ', good])
    msg = error_of(path)
    assert f"{path}:7:" in msg and "malformed JSON" in msg


def test_row_not_an_object(tmp_path):
    msg = error_of(write(tmp_path, [{"prompt": "q", "completion": "a"}, '["q", "a"]']))
    assert ":2:" in msg and "JSON object" in msg and "list" in msg


def test_unknown_format_lists_keys_and_formats(tmp_path):
    msg = error_of(write(tmp_path, [{"question": "q", "answer": "a"}]))
    assert ":1:" in msg and "['answer', 'question']" in msg
    for name in ("messages", "prompt", "instruction", "conversations"):
        assert name in msg


def test_rows_that_disagree_on_format(tmp_path):
    msg = error_of(write(tmp_path, [{"prompt": "q", "completion": "a"},
                                    {"instruction": "q", "output": "a"}]))
    assert ":2:" in msg and "alpaca" in msg and "prompt-completion" in msg and "line 1" in msg


@pytest.mark.parametrize("row,needle", [
    ({"instruction": "q", "output": 5}, "'output' must be a string"),
    ({"prompt": "", "completion": "a"}, "'prompt' is empty"),
    ({"prompt": "q", "completion": None}, "'completion' is null"),
    ({"messages": []}, "empty list"),
    ({"messages": [{"role": U, "content": "q"}]}, "no assistant message"),
    ({"messages": [{"role": U}, {"role": A, "content": "a"}]}, "messages[0] is missing 'content'"),
    ({"messages": [{"role": "bot", "content": "q"}]}, "role 'bot'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}, "from='robot'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}, "conversations[1]"),
    ({"instruction": "", "input": "", "output": "a"}, "both empty"),
])
def test_missing_or_bad_fields_name_the_line(tmp_path, row, needle):
    first = {fmt: good for fmt, good, _ in reversed(FORMATS)}  # a valid row of the same format first
    path = write(tmp_path, [first[detect_format(row)], row])
    msg = error_of(path)
    assert f"{path}:2:" in msg and needle in msg


def test_non_utf8_names_line_and_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps({"prompt": "q", "completion": "a"}).encode()] * 2
    lines.append('{"prompt": "caf\u00e9", "completion": "a"}'.encode("latin-1"))
    path.write_bytes(b"\n".join(lines) + b"\n")
    msg = error_of(path)
    offset = len(lines[0]) * 2 + 2 + len(b'{"prompt": "caf')
    assert f"{path}:3:" in msg and "not UTF-8" in msg and f"byte offset {offset}" in msg and "0xe9" in msg


def test_missing_file_and_empty_file(tmp_path):
    assert "does not exist" in error_of(tmp_path / "nope.jsonl")
    assert "does not exist" in error_of(tmp_path / "nope.jsonl", read_jsonl)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert "no rows" in error_of(empty)


def test_check_counts_duplicates_and_empty_replies(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    rows += [rows[1], {"prompt": "q9", "completion": " "}, rows[1]]
    report = check_file(write(tmp_path, rows))
    assert (report.rows, report.format) == (8, "prompt-completion")
    assert report.duplicates == 2 and report.duplicate_lines == [(6, 2), (8, 2)]
    assert report.empty == 1 and report.empty_lines == [7]
    assert report.lengths is None and not report.ok
    assert json.loads(json.dumps(report.to_dict()))["duplicate_lines"] == [[6, 2], [8, 2]]


def test_check_broken_line_7(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": "a"} for i in range(6)] + ['{"prompt": "q"']
    msg = error_of(write(tmp_path, rows), check_file)
    assert ":7:" in msg


def test_check_token_lengths_and_over_long_rows(tmp_path, tokenizer):
    rows = [{"messages": [{"role": S, "content": "s"}, {"role": U, "content": "word " * n},
                          {"role": A, "content": "ok"}]} for n in (1, 2, 3, 50, 4)]
    path = write(tmp_path, rows)
    report = check_file(path, tokenizer, max_length=40)
    lengths = sorted(len(tokenizer.apply_chat_template(r["messages"])["input_ids"]) for r in rows)
    assert report.lengths == {"p50": lengths[2], "p90": lengths[4], "p99": lengths[4], "max": lengths[4]}
    assert report.tokens == sum(lengths)
    assert report.too_long == 1 and report.too_long_lines == [4]
    assert check_file(path, tokenizer).max_length == 2048  # SmolLM2's tokenizer sets no limit
    out = io.StringIO()
    from rich.console import Console

    from tunelab.cli.tables import check_table

    Console(file=out, width=120).print(check_table(report))
    text = out.getvalue()
    assert "chat" in text and "longer than 40 tokens" in text and f"max {lengths[4]}" in text
