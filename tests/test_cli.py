"""The `peft-graft` console script."""

import hashlib
import json
import re
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from gate_evidence import accepting_evidence
from peft import get_peft_model
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import peft_graft
from peft_graft import GraftConfig
from peft_graft.cli import build_parser, main
from peft_graft.testing.keys import write_key_pair


def save_adapter(model, path, **kwargs):
    get_peft_model(model, GraftConfig(r=4, target_modules=["q_proj", "v_proj"], **kwargs)).save_pretrained(path)


def test_entry_point_is_installed():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "peft-graft"]
    assert script.value == "peft_graft.cli:main"


def test_inspect_reports_the_artifact(tiny_llama, tmp_path, capsys):
    save_adapter(tiny_llama(), tmp_path, projection="orthogonal")
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["modules"] == 4 and report["phi_params"] == 4 * 16
    assert report["stores_projections"] is False
    assert report["file_bytes"] == (tmp_path / "adapter_model.safetensors").stat().st_size


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a child process, as a user runs it (exit status and stderr included)."""
    return subprocess.run([sys.executable, "-m", "peft_graft.cli", *args], capture_output=True, text=True, check=False)


def test_verify_fails_on_a_truncated_file(tiny_llama, tmp_path):
    save_adapter(tiny_llama(), tmp_path)
    ok = _run_cli("verify", str(tmp_path))
    assert ok.returncode == 0 and ok.stdout.startswith("OK:")
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    bad = _run_cli("verify", str(tmp_path))
    assert bad.returncode == 1 and "truncated or corrupt" in bad.stderr


def test_verify_with_a_base_loads_the_adapter_onto_it(tiny_llama, tmp_path, capsys):
    base_dir, adapter = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    save_adapter(tiny_llama(), adapter, projection="svd")
    assert main(["verify", str(adapter), "--base", str(base_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loaded_onto"] == str(base_dir)
    other = tmp_path / "other_base"  # same architecture, other widths: every tensor of the adapter is fine alone
    tiny_llama(intermediate_size=48, hidden_size=48, num_attention_heads=4).save_pretrained(other)
    assert main(["verify", str(adapter)]) == 0
    assert main(["verify", str(adapter), "--base", str(other)]) == 1
    assert "error:" in capsys.readouterr().err


def test_sign_then_verify_with_a_trusted_key(tiny_llama, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    save_adapter(tiny_llama(), adapter)
    private, public = write_key_pair(tmp_path)
    assert main(["sign", str(adapter), "--key", str(private), "--json"]) == 0
    digest = json.loads(capsys.readouterr().out)["signature_sha256"]
    assert digest == hashlib.sha256((adapter / "graft.sig").read_bytes()).hexdigest()
    assert main(["verify", str(adapter), "--trusted-key", str(public)]) == 0
    assert "signature verified" in capsys.readouterr().out
    assert main(["verify", str(adapter), "--trusted-key", str(public), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["signature"]["signature_sha256"] == digest

    _, other = write_key_pair(tmp_path, "other")
    assert main(["verify", str(adapter), "--trusted-key", str(other)]) == 1
    assert "does not verify against" in capsys.readouterr().err
    assert main(["sign", str(adapter), "--key", str(public)]) == 1  # a public key cannot sign
    assert "Cannot sign with" in capsys.readouterr().err
    (tmp_path / "registry.sqlite").touch()
    assert main(["verify", str(tmp_path), "--trusted-key", str(public)]) == 1
    assert "is a registry" in capsys.readouterr().err


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny Llama's 128 ids, built in code (no download)."""
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 128)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


@pytest.fixture
def registry_with_two(tiny_llama, tmp_path):
    """A registry with one accepted and one rejected graft for a saved tiny base."""
    from peft_graft.registry import GraftRegistry, GraftStatus, base_model_fingerprint

    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    registry = GraftRegistry(tmp_path / "registry")
    ids = {}
    for name, status, seed in (("good", GraftStatus.ACCEPTED, 1), ("bad", GraftStatus.REJECTED, 2)):
        model = get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj"], init_weights=False, seed=seed),
                               adapter_name=name)
        model.save_pretrained(tmp_path / "adapters")
        ids[name] = registry.register(
            tmp_path / "adapters" / name if name != "default" else tmp_path / "adapters",
            base_fingerprint=base_model_fingerprint(tiny_llama()), targets=["q_proj"],
            config={**model.peft_config[name].to_dict(), "adapter_name": name}, metrics={"gain": 0.1},
            dataset_fingerprints={}, seeds=[seed], status=status,
            evidence=accepting_evidence() if status is GraftStatus.ACCEPTED else None,
        ).graft_id
    return registry, base_dir, ids


def test_registry_commands(registry_with_two, tmp_path, capsys, local_hub):
    registry, base_dir, ids = registry_with_two
    root = str(registry.root)
    assert main(["list", root, "--json"]) == 0
    listed = {r["graft_id"]: r["status"] for r in json.loads(capsys.readouterr().out)}
    assert listed == {ids["good"]: "ACCEPTED", ids["bad"]: "REJECTED"}
    assert main(["show", root, ids["bad"][:10]]) == 0
    assert json.loads(capsys.readouterr().out)["history"][0]["to"] == "REJECTED"
    assert main(["verify", root]) == 0 and "audit chain" in capsys.readouterr().out

    assert main(["push", root, ids["bad"][:10], "grafts/bad", "--endpoint", local_hub.endpoint]) == 1
    assert "not accepted" in capsys.readouterr().err
    assert main(["push", root, ids["good"][:10], "grafts/good", "--endpoint", local_hub.endpoint]) == 0
    hub = ["--endpoint", local_hub.endpoint]
    assert main(["pull", "grafts/good", str(tmp_path / "other"), "--graft-id", ids["bad"], *hub]) == 1
    assert "not the pinned graft" in capsys.readouterr().err and not (tmp_path / "other").exists()
    assert main(["pull", "grafts/good", str(tmp_path / "pulled"), "--graft-id", ids["good"], *hub]) == 0
    assert (tmp_path / "pulled" / "adapter_model.safetensors").read_bytes() == (
        registry.artifact_dir(ids["good"]) / "adapter_model.safetensors"
    ).read_bytes()
    capsys.readouterr()

    assert main(["consolidate", root, "--base", str(base_dir), "--out", str(tmp_path / "v2"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_drift"] <= 1e-5
    assert (tmp_path / "v2" / "config.json").is_file()
    text = "w1 w2 w3 unknown"
    assert AutoTokenizer.from_pretrained(tmp_path / "v2")(text).input_ids == tiny_tokenizer()(text).input_ids
    assert registry.get(ids["good"]).status.value == "CONSOLIDATED"
    assert main(["rollback", root, ids["bad"][:10]]) == 1


def test_verify_detects_an_edited_audit_record(registry_with_two, capsys):
    import sqlite3

    registry, _, _ = registry_with_two
    with sqlite3.connect(registry.root / "registry.sqlite") as conn:
        tables = [r[0] for r in conn.execute("select name from sqlite_master where type='table'")]
        audit = next(t for t in tables if "audit" in t)
        for (trigger,) in conn.execute("select name from sqlite_master where type='trigger'").fetchall():
            conn.execute(f"drop trigger {trigger}")  # a tamperer with file access can drop the append-only guard
        conn.execute(f"update {audit} set payload = replace(payload, 'REJECTED', 'ACCEPTED')")
    assert main(["verify", str(registry.root)]) == 1
    assert "audit" in capsys.readouterr().err.lower()


def test_every_command_speaks_json_and_unknown_ids_say_so(registry_with_two, capsys):
    registry, _, ids = registry_with_two
    root = str(registry.root)
    assert main(["verify", root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "registry": root, "audit_records": 2}
    assert main(["list", root, "--status", "accepted", "--json"]) == 0
    assert [r["graft_id"] for r in json.loads(capsys.readouterr().out)] == [ids["good"]]
    assert main(["show", root, "zzz"]) == 1
    assert "No graft id" in capsys.readouterr().err
    assert main(["rollback", root, ids["good"][:10], "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"rolled_back": ids["good"]}
    for command in ("inspect", "inspect-base", "verify", "sign", "head", "list", "show", "rollback", "consolidate",
                    "push", "pull", "export"):
        assert "--json" in build_parser()._subparsers._group_actions[0].choices[command].format_help()


def test_inspect_base_counts_what_get_peft_model_trains(tiny_llama, tmp_path, capsys):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().config.save_pretrained(base)  # a config alone: nothing else is read
    assert main(["inspect-base", str(base), "--r", "4", "--target-modules", "q_proj,v_proj"]) == 0
    text = capsys.readouterr().out
    model = get_peft_model(tiny_llama(), GraftConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() in text  # PEFT's own line, same numbers
    assert re.search(r"\*\s+q_proj\s+Linear\s+64 × 64\s+2\s+4,096\s+4\s+32\s+176\n", text)
    assert re.search(r"\n\s+k_proj\s+Linear\s+64 × 32\s+2\s+2,048\s+-", text)
    assert "model.layers.0-1: 2 layer(s) of 7 modules" in text and "output head" in text

    model.save_pretrained(adapter)
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    assert main(["inspect-base", str(base / "config.json"), "--config", str(adapter), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["graft"]
    assert plan["trainable_params"] == model.get_nb_trainable_parameters()[0]
    assert plan["adapter_bytes"] == len(weights) - 8 - int.from_bytes(weights[:8], "little")
    (tmp_path / "graft.json").write_text(json.dumps({"r": 2, "phi": "diagonal", "target_modules": ["q_proj"]}))
    assert main(["inspect-base", str(base), "--config", str(tmp_path / "graft.json"), "--r", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["graft"]["trainable_params"] == 2 * 3  # --r over the file's r

    assert main(["inspect-base", str(tmp_path / "missing")]) == 1
    assert "Cannot read a model config" in capsys.readouterr().err
    assert main(["inspect-base", str(base), "--phi", "round"]) == 1
    assert "Unknown phi='round'" in capsys.readouterr().err


def test_help_loads_no_model_library_and_peft_still_gets_the_tuner():
    """`peft-graft --help` (and every command's) imports none of torch, transformers or peft, so it starts at once.

    The package registers the tuner with PEFT only when peft is imported; the same child process then checks that a
    program which imported peft_graft first and peft later (as transformers' `load_adapter` does) finds GRAFT there
    without touching any peft_graft name.
    """
    code = (
        "import sys\n"
        "import peft_graft\n"
        "from peft_graft.cli import build_parser\n"
        "parser = build_parser()\n"
        "parser.format_help()\n"
        "for sub in parser._subparsers._group_actions[0].choices.values():\n"
        "    sub.format_help()\n"
        "print(sorted({'torch', 'transformers', 'peft', 'safetensors', 'huggingface_hub'} & set(sys.modules)))\n"
        "from peft import PeftType\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
        "print(PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.GRAFT].__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["[]", "GraftConfig"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"peft-graft {peft_graft.__version__} (peft ")


def test_a_closed_pipe_ends_quietly(registry_with_two):
    registry, _, ids = registry_with_two
    command = [sys.executable, "-m", "peft_graft.cli", "show", str(registry.root), ids["good"][:10]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # like `| head` that has already exited: the first write hits a closed pipe
    assert process.wait(timeout=120) == 141
    assert b"Traceback" not in process.stderr.read()


def test_registry_commands_that_read_no_model_import_no_model_library(registry_with_two):
    registry, _, ids = registry_with_two
    code = (
        "import sys\n"
        "from peft_graft.cli import main\n"
        f"for argv in (['list', {str(registry.root)!r}], ['show', {str(registry.root)!r}, {ids['good'][:10]!r}],\n"
        f"             ['head', {str(registry.root)!r}], ['verify', {str(registry.root)!r}]):\n"
        "    assert main(argv + ['--json']) == 0, argv\n"
        "print(sorted({'torch', 'transformers', 'peft', 'safetensors'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
