"""SentencePiece fixture: trains a tiny BPE model with the python `sentencepiece` package
(byte_fallback, Llama-style normaliser settings: identity rules, no whitespace collapsing, dummy
prefix, split digits), writes its pieces/scores/types as a GGUF with tokenizer.ggml.model =
"llama" (no tensors), and records sentencepiece's own ids (with and without BOS) and decodes.

Run from the repository root: python3 tools/tokenizer_fixtures/make_spm.py
"""
import io
import re
import json
import os
import sys

import gguf
import sentencepiece as spm

sys.path.insert(0, os.path.dirname(__file__))
from common import TEST_STRINGS, corpus  # noqa: E402

OUT = "crates/flowgate-engine/tests/data/tok/spm"
USER_DEFINED = ["<tool_call>"]


def main():
    os.makedirs(OUT, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=700,
        byte_fallback=True,
        character_coverage=0.995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=USER_DEFINED,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    model = buf.getvalue()
    with open(f"{OUT}/tiny.model", "wb") as f:
        f.write(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]

    def piece_type(i):
        if sp.is_unknown(i):
            return gguf.TokenType.UNKNOWN
        if sp.is_control(i):
            return gguf.TokenType.CONTROL
        if sp.is_byte(i):
            return gguf.TokenType.BYTE
        if sp.is_unused(i):
            return gguf.TokenType.UNUSED
        if tokens[i] in USER_DEFINED:
            return gguf.TokenType.USER_DEFINED
        return gguf.TokenType.NORMAL

    types = [piece_type(i) for i in range(n)]

    w = gguf.GGUFWriter(f"{OUT}/spm.gguf", arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()

    cases = []
    for s in TEST_STRINGS:
        ids = sp.encode(s)
        cases.append(
            {
                "text": s,
                "ids": ids,
                "ids_bos": sp.encode(s, add_bos=True),
                "decoded": sp.decode(ids),
            }
        )
    # Texts with special/user-defined tokens written in them. "ids" is sentencepiece on the
    # whole string; "ids_segmented" encodes the text between special tokens separately (each
    # with its dummy prefix), which is what llama.cpp and HF's legacy Llama tokenizer do and
    # what prompt builders like Llama-2's and Mistral's reference code do.
    specials = {"<s>": sp.bos_id(), "</s>": sp.eos_id(), "<tool_call>": sp.piece_to_id("<tool_call>")}
    pattern = re.compile("(" + "|".join(re.escape(k) for k in specials) + ")")
    for s in ["call <tool_call> done", "<s>Hello world</s>", "<tool_call>x y", "a</s><s> b"]:
        seg = []
        for part in pattern.split(s):
            if part in specials:
                seg.append(specials[part])
            elif part:
                seg.extend(sp.encode(part))
        cases.append({"text": s, "ids": sp.encode(s), "ids_segmented": seg})
    with open(f"{OUT}/cases.json", "w") as f:
        f.write('{"vocab_size": %d, "bos": %d, "eos": %d, "cases": [\n' % (len(tokens), sp.bos_id(), sp.eos_id()))
        f.write(",\n".join(json.dumps(c, ensure_ascii=False) for c in cases))
        f.write("\n]}\n")
    print(f"vocab {len(tokens)}, {len(cases)} cases")


if __name__ == "__main__":
    main()
