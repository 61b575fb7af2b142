"""Makes the tiny Hugging Face fixtures of `tests/third_party/hf_test.py` (needs torch).

For every architecture `third_party.hf` loads, this builds a tiny random model with
`transformers` (hidden 32, 2 layers, vocab 100), saves it with `save_pretrained` (safetensors;
the RoBERTa one sharded with a tiny `max_shard_size`) together with a tiny WordPiece tokenizer,
runs transformers' own forward pass on fixed inputs, and records the inputs and the last hidden
state in `<name>.npz` beside the folder. CI compares ftlab's forward pass with these outputs
without torch.

Run from the repository root, in a virtualenv with torch, transformers, tokenizers and numpy
(not needed by ftlab itself):

    python tests/third_party/testdata/make_hf_fixtures.py

It rewrites `tests/third_party/testdata/hf/`; commit the result (well under 1 MB).
"""

from __future__ import annotations

import pathlib
import shutil

import numpy as np
import tokenizers
import torch
import transformers

OUT = pathlib.Path(__file__).resolve().parent / "hf"
VOCAB_SIZE = 100
# Fixed inputs: batch 2, seq 8, the second row right-padded by 3 (ids > 4 are plain words).
INPUT_IDS = np.array([[2, 11, 25, 37, 41, 53, 67, 3], [2, 71, 83, 97, 3, 0, 0, 0]], dtype=np.int64)
ATTENTION_MASK = np.array([[1] * 8, [1] * 5 + [0] * 3], dtype=np.int64)
SENTENCE = "the cat sat on a mat"
_WORDS = "the cat sat on a mat dog ran to big red blue".split()


def _tokenizer(specials: list[str], pad: str, unk: str, cls: str, sep: str, mask: str):
    """A WordPiece tokenizer of exactly VOCAB_SIZE entries, specials first."""
    vocab = list(specials) + _WORDS + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab += [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    vocab += [f"[unused{i}]" for i in range(VOCAB_SIZE - len(vocab))]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token=unk)
    )
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab.index(cls)), (sep, vocab.index(sep))],
    )
    tok.decoder = tokenizers.decoders.WordPiece()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        unk_token=unk,
        cls_token=cls,
        sep_token=sep,
        mask_token=mask,
        model_max_length=32,
    )


def _common(**kw):
    return dict(vocab_size=VOCAB_SIZE, **kw)


def models():
    """name -> (model, tokenizer, save_pretrained kwargs)."""
    bert_tok = _tokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
    )
    roberta_tok = _tokenizer(
        ["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<pad>", "<unk>", "<s>", "</s>", "<mask>"
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(
        transformers.BertConfig(
            **_common(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=32,
                type_vocab_size=2,
            )
        )
    )  # with its pooler, as all-MiniLM-L6-v2 ships one: the loader skips it
    roberta = transformers.RobertaModel(
        transformers.RobertaConfig(
            **_common(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=34,
                type_vocab_size=1,
                pad_token_id=1,
                bos_token_id=0,
                eos_token_id=2,
                layer_norm_eps=1e-5,
            )
        ),
        add_pooling_layer=False,
    )
    distilbert = transformers.DistilBertModel(
        transformers.DistilBertConfig(
            **_common(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=32)
        )
    )
    # Random init leaves norms at (1, 0) and biases at 0 (below); perturb them so a swapped or
    # dropped bias/scale shows in the outputs.
    decoder = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    chat_tok = _tokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
    )
    chat_tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    decoders = {
        # SmolLM2's shape: tied embeddings, RoPE base 1e5.
        "llama_tied": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                **decoder, tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5
            )
        ),
        # Llama 3.1's shape: untied head, llama3 RoPE scaling.
        "llama": transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                **decoder,
                tie_word_embeddings=False,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8,
                },
            )
        ),
        "mistral": transformers.MistralForCausalLM(
            transformers.MistralConfig(**decoder, sliding_window=None)
        ),
        "qwen2": transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(**decoder, tie_word_embeddings=True)
        ),
        "qwen3": transformers.Qwen3ForCausalLM(
            transformers.Qwen3Config(**decoder, head_dim=16, tie_word_embeddings=False)
        ),
    }
    for m in (bert, roberta, distilbert, *decoders.values()):
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "norm" in name.lower() or name.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
    return {
        "bert": (bert, bert_tok, {}),
        "roberta": (roberta, roberta_tok, {"max_shard_size": "40KB"}),
        "distilbert": (distilbert, bert_tok, {}),
        **{k: (m, chat_tok if k == "llama_tied" else bert_tok, {}) for k, m in decoders.items()},
    }


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    for name, (model, tok, save_kw) in models().items():
        model.eval()
        folder = OUT / name
        model.save_pretrained(folder, safe_serialization=True, **save_kw)
        tok.save_pretrained(folder)
        ids, mask = INPUT_IDS.copy(), ATTENTION_MASK.copy()
        if name == "roberta":
            ids = np.where(mask == 1, ids, 1)  # its pad id
        extra = {}
        with torch.no_grad():
            inputs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
            if hasattr(model, "lm_head"):  # a decoder: record its logits too
                extra["logits"] = model(**inputs).logits.numpy().astype(np.float32)
                hidden = model.model(**inputs).last_hidden_state.numpy()
            else:
                hidden = model(**inputs).last_hidden_state.numpy()
        np.savez(
            OUT / f"{name}.npz",
            input_ids=ids,
            attention_mask=mask,
            last_hidden_state=hidden.astype(np.float32),
            **extra,
            sentence_ids=np.array(tok(SENTENCE)["input_ids"], dtype=np.int64),
        )
        print(name, sorted(p.name for p in folder.iterdir()))
    (OUT / "VERSIONS").write_text(
        f"torch {torch.__version__}\ntransformers {transformers.__version__}\n"
        f"tokenizers {tokenizers.__version__}\n"
    )


if __name__ == "__main__":
    main()
