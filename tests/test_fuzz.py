"""A bounded mutation campaign in the suite (fixed seed): byte flips, boundary integers and
truncations in the header, metadata and tensor infos, and metadata-level changes, over small q4_0,
q8_0 and Q4_K models; every mutant through inspect and load + 8 tokens must end in success or a
typed pyggml error (tools/fuzz_gguf.py runs longer campaigns, each mutant in its own process)."""
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import fuzz_gguf  # noqa: E402


def test_mutants_end_in_typed_errors(tmp_path):
    logging.disable(logging.CRITICAL)
    try:
        outcomes, escapes = fuzz_gguf.campaign(400, seed=12, folder=tmp_path, in_process=True)
    finally:
        logging.disable(logging.NOTSET)
    assert escapes == {}, escapes
    assert outcomes["typed"] > 50 and outcomes["ok"] > 20, outcomes  # the campaign reaches both ends
