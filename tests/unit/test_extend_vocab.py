"""Vocabulary extension: data_prep.extend_vocab appends pieces, pretrain.export grows the model.

Oracles: the old SentencePiece model (every old id keeps its piece and score), transformers'
DebertaV2Tokenizer/AutoTokenizer (same ids as ours on domain text that uses the new pieces),
transformers' model loading (no missing or unexpected weights), and new embedding rows
recomputed here from the old tokenizer's pieces, independently of `new_piece_sources`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("google.protobuf")

from safetensors.torch import load_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForMaskedLM,
    AutoTokenizer,
    DebertaV2Tokenizer,
)

from data_prep.extend_vocab import (  # noqa: E402
    EXTENSION_FILE,
    extend_tokenizer,
    main,
    read_model_proto,
)
from data_prep.tokenizer import load_tokenizer  # noqa: E402
from pretrain.export import (  # noqa: E402
    ExportError,
    extend_embeddings,
    rtd_from_hf,
    to_hf,
)
from pretrain.export import main as export_main  # noqa: E402
from pretrain.models.deberta import DebertaConfig  # noqa: E402
from pretrain.models.rtd import IGNORE_INDEX, RTDConfig, RTDModel  # noqa: E402
from tests.unit.tiny_rtd import TINY_SHAPE  # noqa: E402

ADD = 40
TERMS = """phosphorylation dehydrogenase glycosylation ubiquitination methyltransferase
oxidoreductase carboxylase isomerase kinase peptide enzyme ligand alpha-helix beta-sheet
chaperone proteasome ribosome cytochrome hemoglobin myoglobin collagen keratin actin myosin
tubulin histone nucleosome chromatin polymerase helicase topoisomerase transcriptase protease
lipase amylase catalase peroxidase glutathione cysteine histidine tryptophan phenylalanine
glutamine asparagine serine threonine tyrosine lysine arginine proline glycine""".split()
FILLER = """the a this that of in on with by from regulates inhibits binds follows requires
precedes activates cleaves modifies stabilises assay sample residue domain site complex
structure pathway cell membrane reaction""".split()
DOMAIN_TEXT = [
    "The kinase catalyses phosphorylation of the peptide substrate.",
    "A methyltransferase and a dehydrogenase bind the same ligand in the alpha-helix.",
    "Ubiquitination\tand  glycosylation\nmark the enzyme; the oxidoreductase is an isomerase.",
]
BASE = dict(num_hidden_layers=4, **TINY_SHAPE)


def _domain_corpus(path: Path) -> Path:
    rng = random.Random(0)
    lines = []
    for _ in range(3000):
        words = [rng.choice(TERMS if rng.random() < 0.4 else FILLER) for _ in range(12)]
        lines.append(" ".join(words).capitalize() + ".")
    path.mkdir(parents=True, exist_ok=True)
    (path / "domain.txt").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def extended(tiny_corpus: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("extend_vocab")
    corpus = _domain_corpus(root / "domain")
    new_dir = root / "tokenizer"
    extend_tokenizer(tiny_corpus["tokenizer"], [corpus], ADD, new_dir, progress=False)
    torch.manual_seed(0)
    model = RTDModel(DebertaConfig(**{**BASE, "vocab_size": tiny_corpus["vocab_size"]}))
    to_hf(model, tiny_corpus["tokenizer"], root / "export")
    written = extend_embeddings(root / "export", tiny_corpus["tokenizer"], new_dir, root / "big")
    return {
        "old": Path(tiny_corpus["tokenizer"]),
        "new": new_dir,
        "corpus": corpus,
        "export": root / "export",
        **{f"out_{k}": v for k, v in written.items()},
    }


def test_old_ids_keep_their_pieces_and_new_pieces_are_appended(extended: dict) -> None:
    old, new = load_tokenizer(extended["old"]), load_tokenizer(extended["new"])
    old_proto, new_proto = read_model_proto(old.path), read_model_proto(new.path)
    assert new.vocab_size == old.vocab_size + ADD
    for i, p in enumerate(old_proto.pieces):
        q = new_proto.pieces[i]
        assert (q.piece, q.score, q.type) == (p.piece, p.score, p.type), i
        assert new.id_to_piece(i) == old.id_to_piece(i)
    info = json.loads((extended["new"] / EXTENSION_FILE).read_text())
    added = [a["piece"] for a in info["added"]]
    assert [a["id"] for a in info["added"]] == list(range(old.vocab_size, new.vocab_size))
    assert added == [new.id_to_piece(i) for i in range(old.vocab_size, new.vocab_size)]
    old_pieces = {p.piece for p in old_proto.pieces}
    assert len(set(added)) == ADD and not set(added) & old_pieces
    scores = [a["score"] for a in info["added"]]
    assert scores == sorted(scores, reverse=True)  # most useful first
    meta = json.loads((extended["new"] / "special_tokens.json").read_text())
    assert (meta["vocab_size"], meta["sha256"]) == (new.vocab_size, new.sha256)
    # the domain words are now pieces of their own
    assert "▁phosphorylation" in added or "▁kinase" in added


def test_transformers_gives_our_ids_on_domain_text(extended: dict) -> None:
    old, new = load_tokenizer(extended["old"]), load_tokenizer(extended["new"])
    uses_new = 0
    for cls in (DebertaV2Tokenizer, AutoTokenizer):
        hf = cls.from_pretrained(extended["new"])
        assert len(hf) == new.vocab_size, cls.__name__
        assert (hf.pad_token_id, hf.cls_token_id, hf.sep_token_id, hf.unk_token_id) == (
            0,
            1,
            2,
            3,
        )
        assert hf.mask_token_id == 4
        for text in DOMAIN_TEXT:
            ids = new.encode(text)
            assert hf(text)["input_ids"] == [new.cls_id, *ids, new.sep_id], (cls, text)
            uses_new += any(i >= old.vocab_size for i in ids)
            assert new.decode(ids) == " ".join(text.split())
    assert uses_new == 2 * len(DOMAIN_TEXT)
    # fewer tokens on domain text than before
    assert sum(len(new.encode(t)) for t in DOMAIN_TEXT) < sum(
        len(old.encode(t)) for t in DOMAIN_TEXT
    )


def _expected_rows(old_table: torch.Tensor, old_dir: Path, new_dir: Path) -> torch.Tensor:
    """New rows recomputed from scratch: SentencePiece directly, text normalised by hand."""
    import sentencepiece as spm

    old_sp = spm.SentencePieceProcessor(model_file=str(old_dir / "spm.model"))
    new_sp = spm.SentencePieceProcessor(model_file=str(new_dir / "spm.model"))
    rows = []
    for i in range(old_sp.get_piece_size(), new_sp.get_piece_size()):
        text = new_sp.id_to_piece(i).replace("\u2581", " ").strip()
        ids = old_sp.encode(text) or [3]
        rows.append(old_table[ids].double().sum(0) / len(ids))
    return torch.stack(rows).float()


def test_extended_models_load_in_transformers_with_mean_initialised_rows(extended: dict) -> None:
    old = load_tokenizer(extended["old"])
    new = load_tokenizer(extended["new"])
    for part, auto in (("discriminator", AutoModel), ("generator", AutoModelForMaskedLM)):
        src, out = extended["export"] / part, extended[f"out_{part}"]
        assert json.loads((out / "config.json").read_text())["vocab_size"] == new.vocab_size
        assert (out / "spm.model").read_bytes() == (extended["new"] / "spm.model").read_bytes()
        assert (out / EXTENSION_FILE).is_file()
        model, info = auto.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (part, info)
        before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
        assert set(before) == set(after)
        prefix = "deberta." if part == "generator" else ""
        word = f"{prefix}embeddings.word_embeddings.weight"
        grown = [word] + (["cls.predictions.bias"] if part == "generator" else [])
        for k, v in before.items():
            if k in grown:
                assert torch.equal(after[k][: old.vocab_size], v), (part, k)  # bit-identical
                expected = _expected_rows(v, extended["old"], extended["new"])
                assert after[k].shape[0] == new.vocab_size
                torch.testing.assert_close(after[k][old.vocab_size :], expected, rtol=0, atol=1e-6)
            else:
                assert torch.equal(after[k], v), (part, k)
        hf_table = model.get_input_embeddings().weight.detach()
        assert torch.equal(hf_table, after[word])
        # a new token's row differs from [UNK]'s when the old tokenizer knew its characters
        assert not torch.equal(hf_table[old.vocab_size], hf_table[old.unk_id])
    head = extended["export"] / "discriminator" / "rtd_head.safetensors"
    assert (extended["out_discriminator"] / "rtd_head.safetensors").read_bytes() == (
        head.read_bytes()
    )


def test_continued_pretraining_runs_on_the_extended_model(extended: dict, tmp_path: Path) -> None:
    new = load_tokenizer(extended["new"])
    ids = [new.cls_id, *new.encode(DOMAIN_TEXT[0]), new.sep_id]
    assert max(ids) >= new.vocab_size - ADD
    for sharing in ("gdes", "nes"):
        model = rtd_from_hf(
            extended["out_discriminator"],
            extended["out_generator"],
            RTDConfig(embedding_sharing=sharing),
        )
        assert model.config.vocab_size == new.vocab_size
        input_ids = torch.tensor([ids, ids])
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, 2] = input_ids[:, 2]
        input_ids[:, 2] = new.mask_id
        out = model(input_ids, torch.ones_like(input_ids), labels, sampling_noise=None)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        word, _ = model.discriminator_embedding_weights()
        table = word if word is not None else model.discriminator.embeddings.word_embeddings.weight
        expected = load_file(extended["out_discriminator"] / "model.safetensors")
        torch.testing.assert_close(
            table.detach(), expected["embeddings.word_embeddings.weight"], rtol=0, atol=1e-6
        )
    # Its export (as after the continued run) still says where its extra ids came from.
    written = to_hf(model, extended["new"], tmp_path / "continued")
    for part in written.values():
        assert (part / EXTENSION_FILE).read_bytes() == (
            extended["new"] / EXTENSION_FILE
        ).read_bytes()


def test_clis_and_refusals(extended: dict, tmp_path: Path, capsys) -> None:
    new_dir = tmp_path / "tok"
    assert (
        main(
            [
                "--tokenizer",
                str(extended["old"]),
                "--input",
                str(extended["corpus"]),
                "--add",
                "5",
                "--out",
                str(new_dir),
                "--quiet",
            ]
        )
        == 0
    )
    assert "added 5 of" in capsys.readouterr().out
    assert load_tokenizer(new_dir).vocab_size == load_tokenizer(extended["old"]).vocab_size + 5
    out = tmp_path / "model"
    argv = ["extend", str(extended["export"]), str(out)]
    argv += ["--old-tokenizer", str(extended["old"]), "--new-tokenizer", str(new_dir)]
    assert export_main(argv) == 0
    assert (out / "discriminator").is_dir() and (out / "generator").is_dir()
    assert "replacing" not in capsys.readouterr().out
    assert export_main(argv) == 0  # again, into the same directory: said
    assert capsys.readouterr().out.endswith(f" (replacing the export that was in {out})\n")
    # An export's directory where a tokenizer's belongs, as the old one or as --out.
    base = ["--input", str(extended["corpus"]), "--add", "5", "--quiet"]
    with pytest.raises(SystemExit) as e:
        main([*base, "--tokenizer", str(extended["export"]), "--out", str(tmp_path / "t2")])
    assert str(e.value) == (
        f"error: --tokenizer {extended['export']} is an export's directory; its tokenizer is "
        f"{extended['export'] / 'discriminator'}"
    )
    with pytest.raises(SystemExit, match="--out .* is an export's directory; write the new"):
        main([*base, "--tokenizer", str(extended["old"]), "--out", str(out)])
    # the extended tokenizer as the "old" one: refused for the tokenizer the export ships and,
    # in a directory without one, for the model's vocabulary
    with pytest.raises(ExportError, match="ships a different tokenizer"):
        extend_embeddings(extended["export"], new_dir, extended["new"], tmp_path / "x")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((extended["export"] / "discriminator" / name).read_bytes())
    with pytest.raises(ExportError, match="vocab_size 400 but the old tokenizer 405"):
        extend_embeddings(bare, new_dir, extended["new"], tmp_path / "x")
    # the two tokenizers swapped
    with pytest.raises(ExportError) as e:
        extend_embeddings(extended["export"], extended["new"], extended["old"], tmp_path / "y")
    assert str(e.value) == (
        f"--new-tokenizer {extended['old']} has 400 ids, fewer than --old-tokenizer "
        f"{extended['new']}'s {400 + ADD}: are the two swapped?"
    )
    # a training run where an export belongs
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ExportError, match=r"run is a training run, .* export it first"):
        extend_embeddings(tmp_path / "run", extended["old"], extended["new"], tmp_path / "y")
    assert export_main(["extend", str(tmp_path / "none"), str(tmp_path / "z"), "--old-tokenizer",
                        str(extended["old"]), "--new-tokenizer", str(new_dir)]) == 1  # fmt: skip
