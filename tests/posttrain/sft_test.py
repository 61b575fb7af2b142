"""SFT data: the assistant-only loss mask with SmolLM2's template, and packing."""

import jax
import numpy as np
import pytest

from ftlab.data import files
from ftlab.models import llama
from ftlab.posttrain import logprobs, sft

CONVERSATION = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4, since two and two make four."},
    {"role": "user", "content": "And in base 3?"},
    {"role": "assistant", "content": "11"},
]


@pytest.fixture(scope="module")
def smollm2():
    from third_party import smollm2 as lib

    gguf = lib.GGUFFile(lib.gguf_path())
    return lib.build_tokenizer(gguf.metadata), files.chat_renderer(lib.CHAT_TEMPLATE)


def _runs(mask):
    """(start, end) of each run of ones."""
    edges = np.diff(np.concatenate([[0], mask, [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def test_loss_mask_holds_the_assistant_turns_exactly(smollm2):
    tokenizer, render = smollm2
    system = {"role": "system", "content": "Be brief."}
    for messages in (CONVERSATION, [system, *CONVERSATION]):
        (enc,) = sft.encode(tokenizer, [messages], render=render)
        decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False)  # noqa: E731
        # the tokens are the rendered text: SmolLM2's default system prompt when none is given
        assert decode(enc.input_ids) == render(messages, False)
        assert ("You are a helpful AI assistant named SmolLM" in render(messages, False)) == (
            messages[0]["role"] != "system"
        )
        masked = [decode(enc.input_ids[a:b]) for a, b in _runs(enc.assistant_mask)]
        assert masked == [
            m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"
        ]
        outside = decode(enc.input_ids[enc.assistant_mask == 0])
        for m in messages:
            assert (m["content"] in outside) == (m["role"] != "assistant"), m


def test_encode_names_a_conversation_it_cannot_split(smollm2):
    tokenizer, render = smollm2
    opens_with_assistant = [{"role": "assistant", "content": "Hello"}]
    with pytest.raises(ValueError, match=r"conversations\[1\]: the chat template"):
        sft.encode(tokenizer, [CONVERSATION, opens_with_assistant], render=render)


def _examples():
    rng = np.random.default_rng(0)
    out = []
    for n in (5, 9, 3, 12, 7, 4, 6):
        ids = rng.integers(1, 64, size=n).astype(np.int32)
        mask = np.zeros(n, np.int32)
        mask[n // 2 :] = 1
        out.append(sft.Encoded(ids, mask))
    return out


def test_packing_lays_out_segments_positions_and_targets():
    ex = _examples()
    packed = sft.pack(ex, seq_len=16, pad_id=99)
    assert packed.input_ids.shape == (4, 16)  # 46 tokens in 4 rows instead of 7
    assert packed.truncated == ()
    for i, e in enumerate(ex):
        row, cols = np.nonzero(packed.source == i)
        assert len(set(row)) == 1
        np.testing.assert_array_equal(packed.input_ids[row, cols], e.input_ids)
        np.testing.assert_array_equal(packed.positions[row, cols], np.arange(len(e.input_ids)))
        np.testing.assert_array_equal(packed.targets[row, cols][:-1], e.input_ids[1:])
        np.testing.assert_array_equal(packed.loss_mask[row, cols][:-1], e.assistant_mask[1:])
        assert packed.loss_mask[row[-1], cols[-1]] == 0  # the segment's end predicts nothing
    assert np.all(packed.input_ids[packed.attention_mask == 0] == 99)
    np.testing.assert_array_equal(packed.segment_ids > 0, packed.attention_mask == 1)
    # one per row: the unpacked layout
    assert sft.pack(ex, seq_len=16, max_segments=1).input_ids.shape == (7, 16)
    cut = sft.pack(ex, seq_len=8)
    assert cut.truncated == (1, 3)
    with pytest.raises(ValueError, match=r"examples\[3\] has no assistant token within seq_len=5"):
        sft.pack(ex, seq_len=5)


def test_packed_and_unpacked_batches_give_the_same_per_conversation_loss():
    cfg = llama.LlamaConfig.tiny()
    model = llama.LlamaForCausalLM(cfg)
    params = llama.init(cfg, jax.random.key(0))
    ex = _examples()

    @jax.jit
    def token_lp(p, b):
        logits = model.apply({"params": p}, b["input_ids"], b["attention_mask"],
                             segment_ids=b["segment_ids"])  # fmt: skip
        return logprobs.token_logprobs(logits, b["targets"])

    def per_conversation(packed):
        lp = np.asarray(token_lp(params, packed.arrays()))
        loss = np.zeros(len(ex))
        for i in range(len(ex)):
            at = (packed.source == i) & (packed.loss_mask == 1)
            loss[i] = -lp[at].mean()
        return loss

    packed = per_conversation(sft.pack(ex, seq_len=16))
    alone = per_conversation(sft.pack(ex, seq_len=16, max_segments=1))
    np.testing.assert_allclose(packed, alone, rtol=1e-5)
    assert np.all(packed > 0)
