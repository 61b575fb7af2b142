"""ShareGPT: the cut-off file decodes record by record; malformed records are named."""

import json

import pytest

from ftlab.data import sharegpt


@pytest.fixture(scope="module")
def records():
    return sharegpt.read()


def test_the_wheel_file_gives_every_complete_record(records):
    assert len(records) == sharegpt.NUM_RECORDS == 17_671
    path = sharegpt.data_path()
    assert path.stat().st_size == 125_509_632
    with path.open("rb") as f:  # why record by record: the list is cut off mid-record
        f.seek(-40, 2)
        assert not f.read().rstrip().endswith(b"]")
    first = records[0]
    assert first.id == "QWJhYvA_0"
    assert first.messages[0]["role"] == "user"
    assert first.messages[0]["content"].startswith("Summarize the main ideas of Jeff Walker")
    roles = {m["role"] for r in records for m in r.messages}
    assert roles == {"system", "user", "assistant"}
    assert sum(len(r.messages) for r in records) == 129_071
    data = sharegpt.for_sft(records)
    # 126 empty records, 17 without an assistant turn, 136 with assistant turns only in front
    assert (data.records_dropped, data.leading_turns_dropped) == (279, 6_369)
    assert all(c[0]["role"] != "assistant" for c in data.conversations)
    assert len(data.conversations) + data.records_dropped == len(records)
    parts = sharegpt.split(data.ids, seed=0, test_fraction=0.05)
    assert len(parts["train"]) + len(parts["test"]) == len(data.ids)
    prefix = {data.ids[i].rsplit("_", 1)[0] for i in parts["test"]}
    assert not any(data.ids[i].rsplit("_", 1)[0] in prefix for i in parts["train"])
    assert 0.03 < len(parts["test"]) / len(data.ids) < 0.07


def _write(tmp_path, text):
    path = tmp_path / "chat.json"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_cut_file_stops_at_the_cut_and_a_malformed_record_is_named(tmp_path):
    good = {"id": "a_0", "conversations": [{"from": "human", "value": "hi"},
                                            {"from": "gpt", "value": "hello"}]}  # fmt: skip
    whole = json.dumps([good, good], indent=2)
    assert len(sharegpt.read(_write(tmp_path, whole))) == 2
    for cut in (len(whole) - 30, len(whole) - 3, whole.rindex('"value"') + 5):
        assert len(sharegpt.read(_write(tmp_path, whole[:cut]))) == 1, cut
    bad_turn = dict(good, conversations=[{"from": "gpt", "value": "x", "weight": 1}])
    path = _write(tmp_path, json.dumps([good, bad_turn, good]))
    with pytest.raises(
        ValueError, match=r"chat.json record 1 \(character \d+\): conversations\[0\]"
    ):
        sharegpt.read(path)
    unknown = dict(good, conversations=[{"from": "robot", "value": "x"}])
    with pytest.raises(ValueError, match=r"record 0 .*from='robot'"):
        sharegpt.read(_write(tmp_path, json.dumps([unknown])))
    # a syntax error mid-file is an error, not a silent end of the data
    broken = (
        json.dumps([good])[:-1] + ', {"id": "b", "conversations": [}, ' + json.dumps(good) + "]"
    )
    with pytest.raises(ValueError, match=r"record 1 .*Expecting value"):
        sharegpt.read(_write(tmp_path, broken))
