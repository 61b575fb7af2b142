"""configs/finetune.py: a Hugging Face encoder folder fine-tuned on a user's CSV file."""

import json
import pathlib

import numpy as np
import pytest

from configs import finetune
from experiments import data, models, schema
from experiments.trainers import classification as trainer

BERT = pathlib.Path(__file__).parents[1] / "third_party" / "testdata" / "hf" / "bert"
WORDS = ("the cat sat", "the dog ran", "a big red mat", "the blue cat", "dog sat on mat")


def csv_file(path: pathlib.Path, rows: int, labels=("neg", "pos")) -> pathlib.Path:
    lines = ["review,y"] + [f"{WORDS[i % 5]},{labels[i % len(labels)]}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


def config_for(tmp_path, arg="tiny,steps=2", **overrides):
    config = finetune.get_config(arg)
    config.model.path = str(BERT)
    config.data.train = str(csv_file(tmp_path / "train.csv", 24))
    config.data.text_column = "review"
    config.data.label_column = "y"
    config.data.max_length = 16
    config.data.holdout_fraction = 0.25
    config.optim.batch_size = 4
    config.evals.batch_size = 4
    config.evals.every_steps = 2
    config.checkpoint.every_steps = 2
    for key, value in overrides.items():
        group, _, name = key.rpartition(".")
        setattr(config[group] if group else config, name, value)
    return config


def test_finetune_runs_on_a_fixture_folder_and_a_csv(tmp_path):
    config = config_for(tmp_path, "tiny,steps=2,method=lora")
    schema.validate(config)
    results = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert results["step"] == 2
    assert np.isfinite(results["eval/test/loss"]) and np.isfinite(results["eval/validation/loss"])
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["step"] == 2 and written["base_params"] > 0
    assert (tmp_path / "run" / "adapter_peft").is_dir()


def test_the_encoder_is_the_folders_weights(tmp_path):
    from third_party import hf

    _, params = models.encoder_classifier(config_for(tmp_path))
    _, loaded, _ = hf.load(BERT)
    np.testing.assert_array_equal(
        params["encoder"]["embeddings"]["word_embeddings"]["embedding"],
        loaded["embeddings"]["word_embeddings"]["embedding"],
    )
    assert set(params) == {"encoder", "head"}


def test_splits_carved_from_train_or_read_from_files(tmp_path):
    config = config_for(tmp_path)
    splits = data.read_file_splits(config)
    assert {k: len(s.text) for k, s in splits.items()} == {"train": 12, "validation": 6, "test": 6}
    assert splits["train"].label_names == ("neg", "pos")
    config.data.validation = str(csv_file(tmp_path / "val.csv", 3))
    config.data.test = str(csv_file(tmp_path / "test.csv", 5))
    splits = data.read_file_splits(config)
    assert {k: len(s.text) for k, s in splits.items()} == {"train": 24, "validation": 3, "test": 5}


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            {"model.num_classes": 3},
            r"config.model.num_classes=3, but config.data.train has 2 labels",
        ),
        (
            {"data.label_column": "label"},
            r"config.data.train=.*train\.csv line 2: no column 'label'",
        ),
        ({"data.integer_labels": True}, r"train\.csv line 2: label 'neg' is not an integer"),
    ],
)
def test_bad_data_settings_name_the_key_and_the_row(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        data.read_file_splits(config_for(tmp_path, **overrides))


def test_a_label_outside_the_training_set_names_the_validation_file(tmp_path):
    config = config_for(tmp_path)
    config.data.validation = str(csv_file(tmp_path / "val.csv", 3, labels=("pos", "meh")))
    with pytest.raises(ValueError, match=r"config.data.validation=.*val\.csv line 3: label 'meh'"):
        data.read_file_splits(config)


def test_schema_refuses_a_rotten_tomatoes_key_and_the_trainer_an_empty_path(tmp_path):
    config = config_for(tmp_path)
    config.data.task = "sentiment"
    with pytest.raises(schema.ConfigError, match=r"config.data.task.*could not take effect"):
        schema.validate(config)
    config = config_for(tmp_path)
    config.model.path = ""
    with pytest.raises(ValueError, match=r"config.model.path is empty; pass --config.model.path"):
        data.build_files(config)
    with pytest.raises(ValueError, match=r"config.model.path is empty"):
        models.encoder_classifier(config)
    config = config_for(tmp_path, **{"data.max_length": 33})
    with pytest.raises(
        ValueError, match=r"config.data.max_length=33 is more than the 32 positions"
    ):
        models.encoder_classifier(config)
    config = config_for(tmp_path)
    config.data.train = ""
    with pytest.raises(ValueError, match=r"config.data.train is empty; pass --config.data.train"):
        data.read_file_splits(config)


def test_a_decoder_folder_is_refused(tmp_path):

    with pytest.raises(ValueError, match=r"config.model.path=.*llama decoder; the classifier"):
        models.hf_encoder(str(BERT.parent / "llama"))
