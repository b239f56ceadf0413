"""``mixsga-train`` (mixsga.train.cli) fine-tunes a user's Hugging Face folder on the user's text and JSONL
files, writes a folder that loads converted, reports both routings, and refuses to resume with other settings."""

import json

import pytest
import torch
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer, words

import mixsga.hf
from mixsga.train.cli import main


@pytest.fixture
def user_files(tmp_path):
    """(model folder, [text file, JSONL file]): a tiny Llama with its tokenizer, and some text."""
    folder = tmp_path / "base"
    tiny_model(dtype=torch.float32).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    text = tmp_path / "notes.txt"
    text.write_text(words(torch.randint(4, 64, (1200,), generator=g)))
    records = tmp_path / "pairs.jsonl"
    records.write_text("\n".join(json.dumps({"prompt": words(torch.randint(4, 64, (20,), generator=g)),
                                             "completion": " " + words(torch.randint(4, 64, (20,), generator=g))})
                                 for _ in range(20)) + "\n")
    return folder, [str(text), str(records)]


def run(folder, data, out, *extra):
    return main(["--model", str(folder), "--data", *data, "--out", str(out), "--block", "16", "--batch-size", "4",
                 "--lr", "1e-2", "--log-every", "1", "--eval-blocks", "8", *extra])


def test_fine_tunes_a_folder_and_writes_a_converted_model(user_files, tmp_path, capsys):
    folder, data = user_files
    out = tmp_path / "run"
    assert run(folder, data, out, "--steps", "3", "--ratios", "0.5,0.25,0.25", "--key-scale", "learned",
               "--prepare") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for when in ("before", "after"):  # both routings, before and after training
        assert set(metrics[when]) == {"expert_choice", "causal_argmax"}
    assert metrics["steps"] == 3 and metrics["kv_fraction"] == pytest.approx(0.5 + 0.125 + 0.0625)
    model = mixsga.hf.from_pretrained(out / "model")
    layer = mixsga.hf.mixsga_layers(model)[0]
    assert layer.ratios == (0.5, 0.25, 0.25) and layer.key_scale == "learned"
    assert "held-out ppl expert_choice" in capsys.readouterr().out
    # The same command resumes (nothing left to do); another setting is refused, naming it.
    assert run(folder, data, out, "--steps", "3", "--ratios", "0.5,0.25,0.25", "--key-scale", "learned",
               "--prepare") == 0
    with pytest.raises(ValueError, match=r"resume: the checkpoint .* is of a run with mixsga=.*'ratios': \[0\.5, "
                                         r"0\.25, 0\.25\].*this run has mixsga=.*'ratios': \[0\.5, 0\.5, 0\.0\]"):
        run(folder, data, out, "--steps", "3", "--ratios", "0.5,0.5,0", "--key-scale", "learned", "--prepare")


def test_trains_the_static_gqa_baseline_and_reads_data_errors_clearly(user_files, tmp_path):
    folder, data = user_files
    assert run(folder, data, tmp_path / "gqa", "--steps", "1", "--gqa", "2") == 0
    assert json.loads((tmp_path / "gqa" / "metrics.json").read_text())["layout"] == "static GQA, 2 KV heads"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "w4 w5"}) + "\n")
    with pytest.raises(ValueError, match=r"--data: .*bad.jsonl:1 has neither 'text' nor 'prompt' and 'completion'"):
        run(folder, [str(bad)], tmp_path / "x", "--steps", "1")
    with pytest.raises(FileNotFoundError, match="--data: no such file"):
        run(folder, [str(tmp_path / "missing.txt")], tmp_path / "x", "--steps", "1")


def test_prepare_with_the_static_baseline_is_refused(user_files, tmp_path, capsys):
    folder, data = user_files
    with pytest.raises(SystemExit):
        run(folder, data, tmp_path / "x", "--steps", "1", "--gqa", "2", "--prepare")
    assert "--prepare: calibrates mixSGA layers" in capsys.readouterr().err
