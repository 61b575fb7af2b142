"""The models several trainers share: the BERT classifier and the decoder that ICL prompts."""

import jax
import pytest

from configs import icl_smollm2, multitask_rotten_tomatoes
from experiments import models


def test_encoder_classifier_refuses_an_unknown_encoder_naming_the_key():
    config = multitask_rotten_tomatoes.get_config("tiny")
    config.model.encoder = "gpt"
    with pytest.raises(
        ValueError, match=r"config.model.encoder='gpt'; expected minilm, tiny or hf"
    ):
        models.encoder_classifier(config)


def test_the_quick_decoder_has_a_stand_in_tokenizer_of_the_texts():
    config = icl_smollm2.get_config("quick")
    decoder = models.decoder(config, ["a tiny review", "a plot"])
    assert decoder.pad_id == 1 and decoder.tokenizer.token_to_id("review") is not None


def test_decoder_computes_in_config_model_dtype_naming_a_bad_one():
    config = icl_smollm2.get_config("quick")
    assert models.decoder(config, ["a b c"]).config.dtype == "float32"  # absent: float32
    config.model.dtype = "bfloat16"
    decoder = models.decoder(config, ["a b c"])
    assert decoder.config.dtype == "bfloat16"
    assert {str(a.dtype) for a in jax.tree.leaves(decoder.params)} == {"float32"}
    assert models.decoder_model_options(config)["dtype"] == "bfloat16"
    config.model.dtype = "float16"
    with pytest.raises(ValueError, match=r"config.model.dtype='float16'; expected"):
        models.decoder(config, ["a b c"])
