"""The models shared by trainers equal the ones the classification and ICL trainers build."""

import chex
import pytest

from configs import icl_smollm2, multitask_rotten_tomatoes
from experiments import models
from experiments.trainers import classification, icl


def test_encoder_classifier_is_classification_build_model():
    # classification.py keeps its own copy until it imports this one; the two must not drift.
    config = multitask_rotten_tomatoes.get_config("tiny")
    model, params = models.encoder_classifier(config)
    reference_model, reference = classification.build_model(config)
    assert model == reference_model
    chex.assert_trees_all_equal(params, reference)
    config.model.encoder = "gpt"
    with pytest.raises(ValueError, match=r"config.model.encoder='gpt'; expected minilm or tiny"):
        models.encoder_classifier(config)


def test_icl_trainer_prompts_the_shared_decoder_tasks():
    assert icl.TASKS is models.DECODER_TASKS
    config = icl_smollm2.get_config("quick")
    decoder = models.decoder(config, ["a tiny review", "a plot"])
    assert decoder.pad_id == 1 and decoder.tokenizer.token_to_id("review") is not None
