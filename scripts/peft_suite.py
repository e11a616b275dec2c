"""Run PEFT's own tests (the installed PEFT release's `tests/`) on graft configs: the generic tuner contract on custom
models (`test_custom_models.py`) and on decoder, encoder-decoder, feature-extraction, sequence-classification,
token-classification and question-answering models, the target_parameters suite and the config suite.

    .venv/bin/python scripts/peft_suite.py [pytest arguments]      # e.g. -x, or -k "Graft and not pickle"

Downloads the PEFT sdist of the installed version and diffusers (which PEFT's test helpers import) from the package
index into a temporary folder. Every LoRA case of the custom-model suite whose keyword arguments a `GraftConfig`
accepts becomes a graft case (plus grouped convolutions and the two-adapter cases); the model suites run two graft
configs (dense Φ on svd projections; diagonal Φ on orthogonal ones), and the target_parameters suite its own cases as
graft cases, on random tiny models rebuilt locally from small configs under the Hub ids the suites name (nothing is
downloaded from the Hub). A development tool, not part of CI: it needs the package index. Last run (PEFT 0.21.2,
transformers 5.24): 2,272 passed, 127 skipped, 91 failed: 85 `*_pickle` tests (peft-graft refuses pickle files on
purpose, `UnsafeSerializationError`); 3 config tests that read `peft-internal-testing/tiny-opt-lora-revision` at
revision "test" from the Hub (offline they fail for every config class); 2 merged-vs-unmerged checks on
`Conv2dGroups2` at PEFT's default 1e-5 (logits reach 3e3 there and the two forwards differ by 2e-3 at -135; PEFT
gives grouped LoHa/LoKr 1e-3 for the same comparison); 1 check that a random r=4 diagonal graft changes what the locally built tiny BART generates in a
mixed-adapter batch (for one of the two adapters greedy decoding keeps every token of the base's; it passes or not
with the random weights of that stand-in model, as an earlier run's failure of the single-adapter form of this check
did).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import peft


GRAFT_CASES = '''
import peft_graft  # noqa: F401  (registers PeftType.GRAFT)
from peft_graft import GraftConfig as _GraftConfig


def _as_graft(cases):
    out = []
    for name, model_id, cls, kwargs in cases:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("lora_alpha", "lora_dropout")}
        if cls is LoraConfig and _accepted(kwargs):
            out.append((name.replace("LoRA", "Graft"), model_id, _GraftConfig, kwargs))
    return out


def _accepted(kwargs):
    try:
        _GraftConfig(**kwargs)
    except Exception:  # a LoRA-only option: not a graft case
        return False
    return True


TEST_CASES[:] = _as_graft(TEST_CASES) + [
    ("Conv1d Groups Graft", "Conv1dGroups", _GraftConfig, {"target_modules": ["conv1d"]}),
    ("Conv1d Groups Graft orthogonal", "Conv1dGroups", _GraftConfig,
     {"target_modules": ["conv1d"], "projection": "orthogonal", "r": 4}),
    ("Conv2d1x1 Graft", "Conv2d1x1", _GraftConfig, {"target_modules": ["conv2d"]}),
    ("Conv1dBigger Graft", "Conv1dBigger", _GraftConfig, {"target_modules": ["conv1d"]}),
]
'''

GRAFT_CONFIG_CLASSES = '''
ALL_PEFT_CONFIG_CLASSES[:] = [_GraftConfig]
MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES[:] = [
    ("Graft Same", "graft", _GraftConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin0"], "init_weights": False}),
    ("Graft Different", "graft", _GraftConfig, {"target_modules": ["lin0"], "init_weights": False},
     {"target_modules": ["lin1"], "init_weights": False}),
    ("Graft + trainable tokens Same", "lora+trainable_tokens", _GraftConfig,
     {"target_modules": ["lin0"], "init_weights": False, "trainable_token_indices": {"emb": [0, 1, 2]}},
     {"target_modules": ["lin0"], "init_weights": False, "trainable_token_indices": {"emb": [3, 4, 5, 6]}}),
]
'''


def insert_before(text: str, marker: str, code: str) -> str:
    at = text.index(marker)
    return text[:at] + code + "\n" + text[at:]


def replace(text: str, old: str, new: str) -> str:
    if old not in text:
        raise SystemExit(f"PEFT's tests changed: {old.strip()!r} not found; update scripts/peft_suite.py")
    return text.replace(old, new)


# The model suites' Hub checkpoints (random tiny models), rebuilt locally from small configs under the same ids: the
# suites load them by id, which resolves to a folder of that name in the working directory.
ENCODER = dict(vocab_size=1000, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
               max_position_embeddings=64, pad_token_id=0)
DECODER = dict(vocab_size=1000, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GPT2 = dict(vocab_size=1000, n_embd=16, n_layer=2, n_head=4, n_positions=100)
MODELS = {
    "peft-internal-testing/tiny-random-OPTForCausalLM": ("OPT", "OPTForCausalLM", dict(
        vocab_size=1000, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, ffn_dim=32,
        word_embed_proj_dim=16, max_position_embeddings=100, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "peft-internal-testing/tiny-random-GPT2LMHeadModel": ("GPT2", "GPT2LMHeadModel", GPT2),
    "hf-internal-testing/tiny-random-gpt2": ("GPT2", "GPT2LMHeadModel", GPT2),
    "peft-internal-testing/tiny-random-GPTJForCausalLM": ("GPTJ", "GPTJForCausalLM", dict(GPT2, rotary_dim=4)),
    "trl-internal-testing/tiny-random-LlamaForCausalLM": ("Llama", "LlamaForCausalLM", DECODER),
    "peft-internal-testing/tiny-dummy-qwen2": ("Qwen2", "Qwen2ForCausalLM", DECODER),
    "hf-internal-testing/tiny-random-MistralForCausalLM": ("Mistral", "MistralForCausalLM", DECODER),
    "hf-internal-testing/tiny-random-Gemma3ForCausalLM": ("Gemma3Text", "Gemma3ForCausalLM", dict(
        DECODER, head_dim=4, sliding_window=8)),
    "peft-internal-testing/tiny-random-T5ForConditionalGeneration-calibrated": ("T5", "T5ForConditionalGeneration", dict(
        vocab_size=1000, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1)),
    "peft-internal-testing/tiny-random-BartForConditionalGeneration": ("Bart", "BartForConditionalGeneration", dict(
        vocab_size=1000, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)),
    "peft-internal-testing/tiny-random-BertModel": ("Bert", "BertModel", ENCODER),
    "peft-internal-testing/tiny-random-RobertaModel": ("Roberta", "RobertaModel", dict(ENCODER, pad_token_id=1)),
    "peft-internal-testing/tiny-random-DebertaModel": ("Deberta", "DebertaModel", ENCODER),
    "peft-internal-testing/tiny-random-DebertaV2Model": ("DebertaV2", "DebertaV2Model", ENCODER),
    "peft-internal-testing/tiny-random-BertForSequenceClassification": ("Bert", "BertForSequenceClassification", ENCODER),
    "peft-internal-testing/tiny-random-RobertaForSequenceClassification": (
        "Roberta", "RobertaForSequenceClassification", dict(ENCODER, pad_token_id=1)),
    "trl-internal-testing/tiny-LlamaForSequenceClassification-3.2": ("Llama", "LlamaForSequenceClassification", DECODER),
    # MoE models whose fused expert stacks the target_parameters suite grafts ((experts, out, in) and gpt-oss's
    # (experts, in, out))
    "trl-internal-testing/tiny-Llama4ForCausalLM": ("Llama4Text", "Llama4ForCausalLM", dict(
        DECODER, hidden_size=32, intermediate_size=32, intermediate_size_mlp=48, head_dim=8, num_local_experts=4,
        num_experts_per_tok=1, interleave_moe_layer_step=1)),
    "trl-internal-testing/tiny-GptOssForCausalLM": ("GptOss", "GptOssForCausalLM", dict(
        DECODER, hidden_size=32, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"])),
}
# suite file -> the task type of its graft configs
MODEL_SUITES = {
    "test_decoder_models.py": "CAUSAL_LM",
    "test_encoder_decoder_models.py": "SEQ_2_SEQ_LM",
    "test_feature_extraction_models.py": "FEATURE_EXTRACTION",
    "test_seq_classifier.py": "SEQ_CLS",
}
MODEL_SUITE_CONFIGS = """
import peft_graft  # noqa: E402,F401
from peft_graft import GraftConfig as _GraftConfig  # noqa: E402

ALL_CONFIGS[:] = [
    (_GraftConfig, {{"task_type": "{task}", "r": 8, "target_modules": None, "bias": "none"}}),
    (_GraftConfig, {{"task_type": "{task}", "r": 4, "target_modules": None, "projection": "orthogonal",
                    "phi": "diagonal"}}),
]
"""
# The target_parameters suite: its LoRA cases (model id, config class, kwargs) as graft cases.
TARGET_PARAMETER_CONFIGS = """
import peft_graft  # noqa: E402,F401
from peft_graft import GraftConfig as _GraftConfig  # noqa: E402

ALL_CONFIGS[:] = [
    (model_id, _GraftConfig, {k: v for k, v in kwargs.items() if k not in ("lora_alpha", "lora_dropout")})
    for model_id, _, kwargs in ALL_CONFIGS
]
"""
# The config suite (save/load, from_peft_type, field handling of every config class) on GraftConfig too; the token
# classification and question answering suites (PEFT's task models that add their head to modules_to_save) on a graft.
CONFIG_SUITE = """
import peft_graft  # noqa: E402,F401
from peft_graft import GraftConfig as _GraftConfig  # noqa: E402

ALL_CONFIG_CLASSES = (*ALL_CONFIG_CLASSES, (_GraftConfig, {}))
"""
TASK_HEAD_CONFIGS = """
import peft_graft  # noqa: E402,F401
from peft_graft import GraftConfig as _GraftConfig  # noqa: E402

TOKEN_CLS_CONFIGS[:] = [(_GraftConfig, {"task_type": "TOKEN_CLS", "target_modules": None})]
QA_CONFIGS[:] = [(_GraftConfig, {"task_type": "QUESTION_ANS", "target_modules": None})]
"""
# PEFT gates these checks by config class; grafts support what they check (Conv1D, mixed adapter batches with and
# without beam search, add_weighted_adapter), so the gates let GraftConfig through.
GATES = {
    "testing_common.py": [
        ("    if config_cls not in (IA3Config, LoHaConfig, LoKrConfig, LoraConfig):",
         "    if config_cls not in (IA3Config, LoHaConfig, LoKrConfig, LoraConfig, GraftConfig):"),
        ("        if not issubclass(config_cls, (LoraConfig, IA3Config)):",
         "        if not issubclass(config_cls, (LoraConfig, IA3Config, GraftConfig)):"),
        ("        if config_cls not in (LoraConfig, RoadConfig):",
         "        if config_cls not in (LoraConfig, RoadConfig, GraftConfig):"),
        ("        if config_cls not in (LoraConfig,):", "        if config_cls not in (LoraConfig, GraftConfig):"),
    ],
    # LoRA refuses add_weighted_adapter with target_parameters, grafts blend them (exactly); both refuse mixed batches
    # on parameter layers with a ValueError, each with its own message
    "test_target_parameters.py": [
        (
            (
                '        msg = "add_weighted_adapter does not support targeting nn.Parameter"\n'
                "        with pytest.raises(ValueError, match=msg):\n"
                "            self._test_weighted_combination_of_adapters("
            ),
            "        self._test_weighted_combination_of_adapters(",
        ),
        ('msg = "lora.ParamWrapper does not support mixed adapter batches yet."',
         'msg = "ParamWrapper does not support mixed adapter batches"'),
    ],
    "test_decoder_models.py": [
        ("        if config_cls != LoraConfig:\n            pytest.skip(\"Mixed adapter batches",
         "        if config_cls not in (LoraConfig, _GraftConfig):\n            pytest.skip(\"Mixed adapter batches"),
    ],
}


def build_models(folder: Path) -> None:
    import torch
    import transformers

    for model_id, (config_name, model_name, kwargs) in MODELS.items():
        torch.manual_seed(0)
        config = getattr(transformers, f"{config_name}Config")(**kwargs)
        getattr(transformers, model_name)(config).save_pretrained(folder / model_id)


def patch_suites(tests: Path) -> list[Path]:
    """Graft cases into PEFT's suites; returns the suite files to run."""
    (tests / "__init__.py").touch()
    custom = tests / "test_custom_models.py"
    text = insert_before(custom.read_text(), "MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [", GRAFT_CASES)
    custom.write_text(insert_before(text, "\nclass MLP(nn.Module):", GRAFT_CONFIG_CLASSES))
    for name, task in MODEL_SUITES.items():
        suite = tests / name
        suite.write_text(insert_before(suite.read_text(), "\nclass ", MODEL_SUITE_CONFIGS.format(task=task)))
    parameters = tests / "test_target_parameters.py"
    parameters.write_text(insert_before(parameters.read_text(), "\nclass MyAutoModelForCausalLM", TARGET_PARAMETER_CONFIGS))
    config = tests / "test_config.py"
    config.write_text(insert_before(config.read_text(), "\n# Config classes that support selecting layers", CONFIG_SUITE))
    heads = tests / "test_token_classification_qa.py"
    heads.write_text(insert_before(heads.read_text(), "\n\nclass TestTokenClassificationModels", TASK_HEAD_CONFIGS))
    common = tests / "testing_common.py"
    common.write_text(insert_before(common.read_text(), "\nclass PeftCommonTester", "from peft_graft import GraftConfig\n"))
    for name, edits in GATES.items():
        path = tests / name
        text = path.read_text()
        for old, new in edits:
            text = replace(text, old, new)
        path.write_text(text)
    return [custom, *(tests / name for name in MODEL_SUITES), parameters, config, heads]


def main(pytest_args: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pip = [sys.executable, "-m", "pip", "-q"]
        subprocess.run(pip + ["download", "--no-deps", "--no-binary", ":all:", f"peft=={peft.__version__}", "-d", tmp],
                       check=True)
        subprocess.run(pip + ["install", "--no-deps", "--target", str(root / "extra"), "diffusers"], check=True)
        with tarfile.open(next(root.glob("peft-*.tar.gz"))) as sdist:
            sdist.extractall(root, filter="data")
        tests = next(root.glob("peft-*/tests"))
        suites = patch_suites(tests)
        models = root / "models"
        build_models(models)
        # PEFT's ini turns transformers' FutureWarnings into errors; with the newer transformers installed here PEFT's
        # own code triggers one (`is_gradient_checkpointing`), which says nothing about grafts
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                   "-W", "default::FutureWarning",
                   "--rootdir", str(tests.parent), *map(str, suites), "-k", "Graft", *pytest_args]
        env = {"PYTHONPATH": f"{root / 'extra'}{os.pathsep}{tests.parent}", "HF_HUB_OFFLINE": "1"}
        return subprocess.run(command, check=False, cwd=models, env={**os.environ, **env}).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
