import json
import logging

import pytest
import torch

from calibration.data import load_calibration_text, make_windows, tokenize_text
from tap_runtime.errors import CalibrationDataError

TEXT = "The quick brown fox jumps over the lazy dog.\n\nA second paragraph follows here."


def test_txt_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    text = load_calibration_text(str(path))
    assert text.documents == ["The quick brown fox jumps over the lazy dog.", "A second paragraph follows here."]
    assert text.source.startswith("file:")


def test_jsonl_file(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["alpha", "beta"])))
    assert load_calibration_text(str(path)).documents == ["alpha", "beta"]


def test_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "calib.parquet"
    pq.write_table(pa.table({"text": ["one", "two", ""], "url": ["a", "b", "c"]}), path)
    assert load_calibration_text(str(path)).documents == ["one", "two"]


def test_saved_datasets_directory(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["x y z", "u v"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_calibration_text(str(tmp_path / "ds")).documents == ["x y z", "u v"]


def test_missing_text_column_is_named(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text(json.dumps({"body": "no text column"}))
    with pytest.raises(CalibrationDataError, match=r"calib.jsonl: no 'text' column"):
        load_calibration_text(str(path))


def test_missing_path_is_an_error():
    with pytest.raises(CalibrationDataError, match=r"does-not-exist.txt: calibration data not found"):
        load_calibration_text("does-not-exist.txt")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "calib.csv"
    path.write_text("text\nhello")
    with pytest.raises(CalibrationDataError, match=r"unsupported calibration file type '.csv'"):
        load_calibration_text(str(path))


def test_wikitext_falls_back_to_the_bundled_sample_with_one_log_line(caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="calibration.data"):
        text = load_calibration_text("wikitext")
    assert text.source.startswith("bundled:wikitext2_calibration.txt.gz")
    assert [r.message for r in caplog.records] == [
        "wikitext: Hub not reachable; using the bundled sample calibration/data/wikitext2_calibration.txt.gz"
    ]
    assert text.num_characters > 400_000


def test_c4_is_the_bundled_sample():
    text = load_calibration_text("c4")
    assert text.dataset == "c4" and len(text.documents) == 1000


def test_a_mix_takes_equal_parts_of_each_source(tmp_path, monkeypatch):
    """'wikitext+c4' (or files joined by '+'): each source cut to the shortest one's characters,
    one after another, so uniformly drawn windows fall on both in equal shares."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mix = load_calibration_text("wikitext+c4")
    wikitext, c4 = load_calibration_text("wikitext"), load_calibration_text("c4")
    limit = min(wikitext.num_characters, c4.num_characters)
    assert mix.dataset == "wikitext+c4" and "equal parts" in mix.source
    assert abs(mix.num_characters - 2 * limit) <= 1
    first_c4 = mix.documents.index(c4.documents[0])
    assert sum(len(d) for d in mix.documents[:first_c4]) == limit
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text("abcdef")
    long.write_text("x" * 20 + "\n\n" + "y" * 20)
    assert load_calibration_text(f"{short}+{long}").documents == ["abcdef", "x" * 6]
    with pytest.raises(CalibrationDataError, match="two or more sources"):
        load_calibration_text("wikitext+")
    with pytest.raises(CalibrationDataError, match="not found"):
        load_calibration_text(f"{short}+{tmp_path / 'missing.txt'}")


def test_windows_are_seeded_non_overlapping_and_start_with_bos():
    ids = torch.arange(1000)
    first = make_windows(ids, 5, 65, seed=1, bos_token_id=999_999)
    again = make_windows(ids, 5, 65, seed=1, bos_token_id=999_999)
    assert torch.equal(first, again)
    assert first.shape == (5, 65) and (first[:, 0] == 999_999).all()
    starts = sorted(int(w[1]) for w in first)
    assert all(b - a >= 64 for a, b in zip(starts, starts[1:]))
    assert not torch.equal(first, make_windows(ids, 5, 65, seed=2, bos_token_id=999_999))


def test_too_little_text_says_how_much_there_is():
    with pytest.raises(
        CalibrationDataError,
        match=r"sample: too little text; expected at least 1024 tokens for 8 windows of 128, got 1000 tokens \(7 windows\)",
    ):
        make_windows(torch.arange(1000), 8, 128, seed=0, source="sample")


def test_tokenize_joins_documents(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    ids = tokenize_text(tokenizer, load_calibration_text("c4"))
    assert ids.dtype == torch.long and ids.numel() > 100_000


def test_special_token_spellings_are_read_as_text(tiny_tokenizer_dir):
    """WikiText spells ``<unk>``; taken as the reserved id, it puts untrained logits into every
    perplexity. The text is read as characters instead, in calibration and evaluation alike."""
    from transformers import AutoTokenizer

    from calibration.data import CalibrationText, text_token_ids

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    spelled = "a cat </s> sat <s> here"
    assert tokenizer.eos_token_id in tokenizer(spelled, add_special_tokens=False)["input_ids"]
    ids = text_token_ids(tokenizer, spelled)
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert tokenizer.decode(ids) == spelled
    joined = tokenize_text(tokenizer, CalibrationText(documents=[spelled, spelled], dataset="test", source="test"))
    assert not set(joined.tolist()) & set(tokenizer.all_special_ids)


def test_wikitext_uses_the_hub_dataset_when_reachable(monkeypatch):
    import datasets

    import calibration.data as data

    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return {"text": ["", " = Heading = \n", "Some raw text.\n"]}

    monkeypatch.setattr(data, "_hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    text = load_calibration_text("wikitext")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "train")]
    assert text.source == "hub:wikitext/wikitext-2-raw-v1:train"
    assert text.documents == [" = Heading = \n", "Some raw text.\n"]
