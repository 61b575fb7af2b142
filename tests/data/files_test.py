"""ftlab.data.files: CSV / JSON Lines / Parquet files, each bad row named by file and line."""

import json
import pathlib

import numpy as np
import pytest

from ftlab.data import batching, files
from third_party import hf

BERT = pathlib.Path(__file__).parents[1] / "third_party" / "testdata" / "hf" / "bert"


@pytest.fixture(scope="module")
def tokenizer_files():
    return hf.load(BERT)[2]


def write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: pathlib.Path, rows) -> pathlib.Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


# --- classification -----------------------------------------------------------------------------


def test_csv_string_labels_sorted_and_encoded(tmp_path, tokenizer_files):
    path = write(
        tmp_path / "train.csv",
        'review,y\n"the cat, sat",pos\nthe dog ran,neg\n"a big\nred mat",pos\n',
    )
    data = files.read_classification(path, text_column="review", label_column="y")
    assert data.text == ["the cat, sat", "the dog ran", "a big\nred mat"]
    assert data.label_names == ("neg", "pos")
    np.testing.assert_array_equal(data.label, [1, 0, 1])
    arrays = files.encode_classification(tokenizer_files.build(8), data, max_length=8)
    assert arrays["input_ids"].shape == (3, 8) and arrays["input_ids"][0, 0] == 2  # [CLS]
    batch = batching.train_batch(arrays, 0, batch_size=2, seed=0)
    assert set(batch) == {"input_ids", "attention_mask", "label"}


def test_csv_error_names_the_line_of_a_multiline_record(tmp_path):
    # The record on lines 2-3 spans two lines, so the bad label sits on line 4, not row 3.
    path = write(tmp_path / "d.csv", 'text,label\n"a\nb",pos\nthe cat,meh\n')
    with pytest.raises(ValueError, match=r"d\.csv line 4: label 'meh' is not one of label_names"):
        files.read_classification(path, label_names=["neg", "pos"])


def test_jsonl_int_labels_and_other_splits(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    data = files.read_classification(path, num_classes=3)
    assert data.label_names is None
    np.testing.assert_array_equal(data.label, [0, 2])
    with pytest.raises(
        ValueError, match=r"d\.jsonl line 2: label 2 is outside \[0, num_classes=2\)"
    ):
        files.read_classification(path, num_classes=2)
    with pytest.raises(ValueError, match=r"d\.jsonl line 1: label 0 is int; string labels"):
        files.read_classification(path)


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"text": "a", "label": "x"}, {"txt": "b", "label": "x"}], r"line 2: no column 'text'"),
        ([{"text": "a", "label": "x"}, {"text": "  ", "label": "x"}], r"line 2: text is empty"),
        ([{"text": 3, "label": "x"}], r"line 1: text is int \(3\), expected a string"),
        ([{"text": "a"}], r"line 1: no column 'label' \(label_column\)"),
        ([{"text": "a", "label": True}], r"line 1: label True is bool"),
    ],
)
def test_bad_classification_rows(tmp_path, rows, match):
    with pytest.raises(ValueError, match=r"bad\.jsonl " + match):
        files.read_classification(jsonl(tmp_path / "bad.jsonl", rows))


def test_malformed_json_and_non_object(tmp_path):
    path = write(tmp_path / "m.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", \n')
    with pytest.raises(ValueError, match=r"m\.jsonl line 3: malformed JSON"):
        files.read_classification(path)
    path = write(tmp_path / "l.jsonl", '["a", "x"]\n')
    with pytest.raises(ValueError, match=r"l\.jsonl line 1: a JSON list, expected an object"):
        files.read_classification(path)


def test_csv_field_count_unknown_suffix_and_both_label_modes(tmp_path):
    with pytest.raises(ValueError, match=r"f\.csv line 3: 3 fields, but the header has 2"):
        files.read_classification(write(tmp_path / "f.csv", "text,label\na,x\nb,x,y\n"))
    with pytest.raises(ValueError, match=r"unknown file type '\.tsv'"):
        files.read_classification(write(tmp_path / "f.tsv", "text\tlabel\n"))
    with pytest.raises(ValueError, match="not both"):
        files.read_classification(tmp_path / "f.csv", label_names=["x"], num_classes=2)
    with pytest.raises(ValueError, match=r"i\.csv line 2: label 'one' is not an integer"):
        files.read_classification(write(tmp_path / "i.csv", "text,label\na,one\n"), num_classes=2)
    np.testing.assert_array_equal(
        files.read_classification(
            write(tmp_path / "j.csv", "text,label\na,1\n"), num_classes=2
        ).label,
        [1],
    )
    with pytest.raises(ValueError, match=r"e\.csv line 3: label is empty"):
        files.read_classification(write(tmp_path / "e.csv", "text,label\na,x\nb,\n"))
    # Excel's byte-order mark is not part of the first column's name.
    bom = files.read_classification(write(tmp_path / "bom.csv", "\ufefftext,label\na,x\n"))
    assert bom.text == ["a"]


def test_parquet_rows_named_by_index(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b", ""], "label": ["x", "y", "x"]}), path)
    with pytest.raises(ValueError, match=r"d\.parquet row 2: text is empty"):
        files.read_classification(path)
    pq.write_table(pa.table({"text": ["a", "b"], "label": [1, 0]}), path)
    np.testing.assert_array_equal(files.read_classification(path, num_classes=2).label, [1, 0])


def test_seeded_split_is_deterministic_and_disjoint():
    data = files.TextClassification(
        [str(i) for i in range(10)], np.arange(10, dtype=np.int32), None
    )
    a = files.seeded_split(data, {"train": 0.8, "test": 0.2}, seed=3)
    b = files.seeded_split(data, {"train": 0.8, "test": 0.2}, seed=3)
    assert a["train"].text == b["train"].text and len(a["test"].text) == 2
    assert sorted(a["train"].text + a["test"].text) == sorted(data.text)
    assert (
        a["train"].text
        != files.seeded_split(data, {"train": 0.8, "test": 0.2}, seed=4)["train"].text
    )
    with pytest.raises(ValueError, match=r"fractions\['test'\]=0.01 of 10 rows is no rows"):
        files.seeded_split(data, {"train": 0.99, "test": 0.01}, seed=0)
    with pytest.raises(ValueError, match="sum to"):
        files.seeded_split(data, {"train": 0.5, "test": 0.2}, seed=0)


# --- chat ---------------------------------------------------------------------------------------

CHAT = [
    {
        "messages": [
            {"role": "system", "content": "be red"},
            {"role": "user", "content": "the cat"},
            {"role": "assistant", "content": "sat on"},
            {"role": "user", "content": "the dog"},
            {"role": "assistant", "content": "ran"},
        ]
    },
    {"conversations": [{"from": "human", "value": "big"}, {"from": "gpt", "value": "mat"}]},
]


def masked_text(tokenizer, text, loss_mask):
    import tokenizers

    tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    enc = tok.encode(text, add_special_tokens=False)
    return "".join(text[a:b] for (a, b), m in zip(enc.offsets, loss_mask, strict=False) if m)


def test_chat_openai_and_sharegpt_loss_mask_is_assistant_only(tmp_path, tokenizer_files):
    convs = files.read_chat(jsonl(tmp_path / "c.jsonl", CHAT))
    assert convs[1] == [{"role": "user", "content": "big"}, {"role": "assistant", "content": "mat"}]
    tok = tokenizer_files.build()
    out = files.encode_chat(tok, convs, max_length=160, pad_id=0)
    assert out["input_ids"].shape == (2, 160)
    render = files.chat_renderer()
    assert render(convs[1], False) == (
        "<|im_start|>user\nbig<|im_end|>\n<|im_start|>assistant\nmat<|im_end|>\n"
    )
    # Exactly the assistant contents and their end markers are in the loss; no role header.
    assert masked_text(tok, render(convs[0], False), out["loss_mask"][0]) == (
        "saton<|im_end|>ran<|im_end|>"
    )
    assert masked_text(tok, render(convs[1], False), out["loss_mask"][1]) == "mat<|im_end|>"
    assert not (out["loss_mask"] & (1 - out["attention_mask"])).any()


def test_chat_uses_the_given_template(tokenizer_files):
    template = (
        "{% for m in messages %}{{ bos_token }}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}{{ bos_token }}assistant: {% endif %}"
    )
    render = files.chat_renderer(template, bos_token="[CLS]")
    conv = [{"role": "user", "content": "cat"}, {"role": "assistant", "content": "dog"}]
    tok = tokenizer_files.build()
    out = files.encode_chat(tok, [conv], max_length=40, pad_id=0, render=render)
    text = render(conv, False)
    assert text == "[CLS]user: cat\n[CLS]assistant: dog\n"
    assert masked_text(tok, text, out["loss_mask"][0]) == "dog"
    with pytest.raises(ValueError, match=r"conversations\[0\]: no assistant token within"):
        files.encode_chat(tok, [conv], max_length=5, pad_id=0, render=render)


@pytest.mark.parametrize(
    "row, match",
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\] has role='robot'"),
        (
            {"conversations": [{"from": "bard", "value": "x"}]},
            r"conversations\[0\] has from='bard'",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        ({"messages": [{"role": "assistant"}]}, r"messages\[0\] must be an object with"),
        ({"messages": [{"role": "assistant", "content": ["x"]}]}, r"content is list"),
        ({"messages": []}, "must be a non-empty list"),
        (
            {"messages": [{"role": "assistant", "content": "x", "name": "bot"}]},
            r"messages\[0\] has field\(s\) \['name'\] that cannot take effect",
        ),
        (
            {"conversations": [{"from": "gpt", "value": "x", "weight": 0}]},
            r"conversations\[0\] has field\(s\) \['weight'\]",
        ),
        ({"text": "x"}, "exactly one of 'messages'"),
    ],
)
def test_bad_chat_rows(tmp_path, row, match):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(ValueError, match=r"c\.jsonl line 2: .*" + match):
        files.read_chat(jsonl(tmp_path / "c.jsonl", [good, row]))


def test_chat_refuses_csv(tmp_path):
    with pytest.raises(ValueError, match="a CSV cell holds no list"):
        files.read_chat(write(tmp_path / "c.csv", "messages\nx\n"))


# --- preferences --------------------------------------------------------------------------------


def test_preferences_loss_on_response_only(tmp_path, tokenizer_files):
    rows = [{"prompt": "the cat ", "chosen": "sat", "rejected": "ran to"}]
    data = files.read_preferences(jsonl(tmp_path / "p.jsonl", rows))
    tok = tokenizer_files.build()
    out = files.encode_preferences(tok, data, max_length=12, pad_id=0)
    assert masked_text(tok, "the cat sat", out["chosen_loss_mask"][0]) == "sat"
    assert masked_text(tok, "the cat ran to", out["rejected_loss_mask"][0]) == "ranto"
    np.testing.assert_array_equal(out["chosen_attention_mask"][0, :4], [1, 1, 1, 0])
    with pytest.raises(
        ValueError, match=r"p2\.jsonl line 1: no column 'rejected' \(rejected_column\)"
    ):
        files.read_preferences(jsonl(tmp_path / "p2.jsonl", [{"prompt": "a", "chosen": "b"}]))
    with pytest.raises(ValueError, match=r"p3\.jsonl line 1: chosen is empty"):
        files.read_preferences(
            jsonl(tmp_path / "p3.jsonl", [{"prompt": "a", "chosen": "", "rejected": "b"}])
        )
