"""A saved converted model loads in tools that never ``import mixsga``: transformers' custom-code path
(``trust_remote_code=True``, through the auto_map and shim that save_pretrained writes; remote_code.py)
and lm-eval's command line. Every such load runs in a fresh subprocess, which never imports mixsga
itself (only the shim does); its results come back through files and are compared here with the
converted model of this process."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mixsga.hf  # noqa: E402
from mixsga.hf.remote_code import SHIM_FILENAME  # noqa: E402
from tiny_models import tiny_model  # noqa: E402
from tiny_tokenizer import tiny_tokenizer  # noqa: E402

GROUP_SIZES = (1, 2, 4)
RATIOS = (0.3, 0.1, 0.6)
IDS = torch.tensor([[5, 17, 9, 33, 41, 8, 12, 60, 7, 21, 3, 44]])
SUBPROCESS_TIMEOUT_S = 240

# A local loglikelihood task for lm-eval: each context is scored with " " + its continuation (lm-eval
# puts no delimiter between them for this output type, so the task's doc_to_target starts with the
# space). Words are the tiny tokenizer's ("w4" ... "w63").
LOGLIKELIHOOD_DOCS = [
    {"context": "w5 w17 w9 w33", "continuation": "w41 w8"},
    {"context": "w12 w60 w7 w21 w44 w30", "continuation": "w19"},
    {"context": "w50 w6", "continuation": "w10 w11 w12"},
    {"context": "w63 w4 w25 w26 w27", "continuation": "w40 w41"},
]
TASK_NAME = "mixsga_tiny_loglikelihood"
# lm-eval runs the model in float32 (dtype=float32) on one sequence at a time (--batch_size 1, so no
# padding token enters the routing); the direct computation does the same from the same checkpoint,
# so only float32 summation order may differ (seen: 5e-7).
LOGLIKELIHOOD_ATOL = 1e-5


def _randomize_routers(model, seed: int = 7) -> None:
    """Random router weights: the routing then differs from token to token, so a converted model's
    logits differ clearly from the vanilla model's (a load that dropped the conversion shows)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mixsga.hf.mixsga_layers(model):
            for tensor in (layer.router.proj.weight, layer.router.proj.bias):
                tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, converted model): a converted tiny Llama with random routers, saved with a tokenizer."""
    model = tiny_model()
    mixsga.hf.convert(model, group_sizes=GROUP_SIZES, ratios=RATIOS)
    _randomize_routers(model)
    folder = tmp_path_factory.mktemp("converted")
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)  # lm-eval needs one; words "w4".."w63" are ids 4..63
    return folder, model


def _fresh_env(tmp_path) -> dict:
    """The environment of a fresh subprocess: this one's (PYTHONPATH included, so the shim finds
    mixsga), offline, with its own HF cache (transformers copies the shim into HF_HOME/modules)."""
    env = dict(os.environ)
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def _run(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], env=_fresh_env(tmp_path), cwd=tmp_path, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=SUBPROCESS_TIMEOUT_S)
    assert result.returncode == 0, f"{args[:2]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _vanilla_logits(ids: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Logits of the unconverted tiny model (the same backbone weights as the converted one)."""
    with torch.no_grad():
        return tiny_model().to(dtype)(ids).logits


def test_save_writes_auto_map_and_shim(saved):
    folder, _ = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mixsga_llama"
    assert config["auto_map"] == {
        "AutoConfig": "modeling_mixsga.MixSGALlamaConfig",
        "AutoModelForCausalLM": "modeling_mixsga.MixSGALlamaForCausalLM",
    }
    shim = (folder / SHIM_FILENAME).read_text()
    assert "import mixsga.hf" in shim and "pip install mixsga" in shim
    assert len(shim.splitlines()) < 40, "the shim must re-export mixsga's classes, not hold model code"


def test_fresh_interpreter_loads_with_trust_remote_code(saved, tmp_path):
    folder, model = saved
    torch.save(IDS, tmp_path / "ids.pt")
    resaved = tmp_path / "resaved"
    script = textwrap.dedent(f"""
        import sys
        import torch
        import transformers

        folder, out = {str(folder)!r}, {str(tmp_path / "out.pt")!r}
        try:  # without trust_remote_code transformers must refuse the folder, never load a vanilla model
            transformers.AutoModelForCausalLM.from_pretrained(folder)
            refused = ""
        except ValueError as error:
            refused = str(error)
        imported_before = "mixsga" in sys.modules
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / "ids.pt")!r})).logits
        # Saving again where transformers took the config class for custom code must write the same folder.
        model.save_pretrained({str(resaved)!r})
        torch.save(dict(refused=refused, imported_before=imported_before, config_class=type(config).__name__,
                        settings=config.mixsga, model_class=type(model).__name__, logits=logits), out)
    """)
    _run(["-c", script], tmp_path)
    result = torch.load(tmp_path / "out.pt")

    assert not result["imported_before"]
    assert "trust_remote_code" in result["refused"], result["refused"]
    assert result["config_class"] == "MixSGALlamaConfig"
    assert result["settings"] == model.config.mixsga
    assert result["model_class"] == "LlamaForCausalLM"
    with torch.no_grad():
        expected = model(IDS).logits
    assert (expected - _vanilla_logits(IDS)).abs().max() > 1e-2, "test setup: converted == vanilla model"
    # Same float64 weights and the same code on the same CPU: equal up to summation order.
    torch.testing.assert_close(result["logits"], expected, rtol=0, atol=1e-10)

    # The re-saved folder: same config.json (no junk accumulates in auto_map), the shim and no copy of
    # mixsga's sources (transformers' register_for_auto_class would copy config.py).
    assert json.loads((resaved / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    assert (resaved / SHIM_FILENAME).read_text() == (folder / SHIM_FILENAME).read_text()
    assert sorted(p for p in os.listdir(resaved) if p.endswith(".py")) == [SHIM_FILENAME]


def test_missing_mixsga_gives_install_hint(saved, tmp_path):
    folder, _ = saved
    script = textwrap.dedent(f"""
        import sys
        sys.modules["mixsga"] = None  # makes `import mixsga` fail as if it were not installed
        import transformers
        try:
            transformers.AutoConfig.from_pretrained({str(folder)!r}, trust_remote_code=True)
        except ImportError as error:
            print("IMPORT ERROR:", error)
    """)
    out = _run(["-c", script], tmp_path).stdout
    assert "IMPORT ERROR:" in out and "pip install mixsga" in out, out


def test_in_process_loads_unchanged(saved):
    """With mixsga imported, the registered classes load the folder (with or without trust_remote_code,
    and through mixsga.hf.from_pretrained); the auto_map changes nothing there."""
    folder, model = saved
    with torch.no_grad():
        expected = model(IDS).logits
        for loaded in (
            mixsga.hf.from_pretrained(folder),
            transformers.AutoModelForCausalLM.from_pretrained(folder),
            transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True),
        ):
            assert mixsga.hf.is_converted(loaded)
            torch.testing.assert_close(loaded(IDS).logits, expected, rtol=0, atol=1e-10)
    config = transformers.AutoConfig.from_pretrained(folder)
    assert config.auto_map == json.loads((folder / "config.json").read_text())["auto_map"]
    assert config.to_dict()["auto_map"] == config.auto_map  # a round trip adds nothing


def _direct_loglikelihoods(model, tokenizer) -> list[float]:
    """What lm-eval computes per doc: the summed log-softmax of the continuation's tokens given the
    context, the model fed (context + continuation)[:-1] as one unpadded sequence."""
    values = []
    for doc in LOGLIKELIHOOD_DOCS:
        n_context = len(tokenizer(doc["context"], add_special_tokens=False).input_ids)
        whole = tokenizer(doc["context"] + " " + doc["continuation"], add_special_tokens=False).input_ids
        with torch.no_grad():
            logprobs = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
        values.append(sum(logprobs[p, whole[p + 1]].item() for p in range(n_context - 1, len(whole) - 1)))
    return values


def test_lm_eval_cli_scores_the_converted_model(saved, tmp_path):
    pytest.importorskip("lm_eval")  # the suite's other tools are optional the same way
    folder, _ = saved
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in LOGLIKELIHOOD_DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK_NAME}.yaml").write_text(textwrap.dedent(f"""\
        task: {TASK_NAME}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: loglikelihood
        doc_to_text: "{{{{context}}}}"
        doc_to_target: " {{{{continuation}}}}"
        metadata:
          version: 1.0
    """))
    results = tmp_path / "results"
    _run(["-m", "lm_eval", "--model", "hf",
          "--model_args", f"pretrained={folder},trust_remote_code=True,dtype=float32",
          "--tasks", TASK_NAME, "--include_path", str(tasks), "--device", "cpu", "--batch_size", "1",
          "--log_samples", "--output_path", str(results)], tmp_path)

    sample_files = glob.glob(str(results / "**" / f"samples_{TASK_NAME}_*.jsonl"), recursive=True)
    assert len(sample_files) == 1, f"expected one samples file under {results}, got {sample_files}"
    samples = sorted((json.loads(line) for line in open(sample_files[0])), key=lambda s: s["doc_id"])
    assert [s["doc"] for s in samples] == LOGLIKELIHOOD_DOCS
    reported = [float(s["resps"][0][0][0]) for s in samples]  # resps: [[(loglikelihood, is_greedy)]]

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    expected = _direct_loglikelihoods(mixsga.hf.from_pretrained(folder, dtype=torch.float32), tokenizer)
    assert reported == pytest.approx(expected, rel=0, abs=LOGLIKELIHOOD_ATOL)
    # The check can fail: a vanilla model (the conversion dropped) scores the docs measurably otherwise.
    vanilla = _direct_loglikelihoods(tiny_model(dtype=torch.float32), tokenizer)
    assert max(abs(a - b) for a, b in zip(vanilla, reported, strict=True)) > 100 * LOGLIKELIHOOD_ATOL
