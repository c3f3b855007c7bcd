"""End-to-end anchor: PPM-only BPB on the wiki2015_sp8192 proxy validation stream equals the
figure the unmodified reference script logged on these machines (ANCHORS.md: all 3,732,293
validation bytes, ppm_only 2.3826). PPM-only depends on the byte stream alone, so this checks
the byte stream (SPEC 6.2, ByteTables) and the PPM (SPEC 6.3) against the reference's own run."""
from __future__ import annotations

import json
import lzma

import numpy as np

from parlm.data.tokenizer import ByteTables
from parlm.ppm import TokenByteLayout, legacy_mixture


def test_proxy_validation_ppm_only_matches_reference_log(wiki_docs_path, sp8192_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp8192_path))
    with lzma.open(wiki_docs_path, "rt", encoding="utf-8") as fh:
        texts = [json.loads(next(fh))["text"] for _ in range(250)]  # the proxy's validation docs
    tokens = np.concatenate([np.array([1] + ids) for ids in sp.encode(texts)])
    assert len(tokens) == 1_047_613
    usable = (len(tokens) - 1) // 2048 * 2048  # validation tail dropped (SPEC 1.4)
    target, prev = tokens[1:usable + 1], tokens[:usable]
    layout = TokenByteLayout.from_byte_tables(ByteTables.from_tokenizer(sp8192_path))
    result = legacy_mixture(target, prev, np.ones(len(target)), layout, trace_max=0)
    assert result.bytes == 3_732_293
    assert round(result.ppm_only_bpb, 4) == 2.3826
