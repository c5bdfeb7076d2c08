"""The standalone export (``save_pretrained`` / ``from_pretrained``, huggingface_hub conventions): identical outputs
with memory, the head layout of pruned models (a fully pruned layer included), the model card, the export command,
loading without Lightning, and one-line errors for folders whose weights do not match their config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_modules.export import main as export_main
from lightning_modules.model import MemoryTransformerLM
from lightning_modules.training.language_model import LanguageModel

VOCAB = 60
REPO = Path(__file__).resolve().parents[2]


def tiny_model(layer_type: str = "all_attention", **overrides) -> MemoryTransformerLM:
    config = dict(vocab_size=VOCAB, layer_type=layer_type, n_layers=3, d_model=16, n_heads=4, d_head=4,
                  n_persistent=8, d_inner=32, tgt_len=8, mem_len=8, cutoffs=[20, 40], div_value=2.0, max_len=32)
    torch.manual_seed(0)
    return MemoryTransformerLM(**(config | overrides))


def pruned_model(layer_type: str) -> MemoryTransformerLM:
    """Layer 0 keeps heads 1 and 3, layer 1 loses every head, layer 2 is whole; gates on, output scaling on."""
    model = tiny_model(layer_type, output_scaling=True)
    model.gates_enabled = True
    with torch.no_grad():
        for layer in model.layers:
            layer.gate.log_alpha.uniform_(-1, 3)
    model.prune_heads({0: [0, 2], 1: [0, 1, 2, 3]})
    return model.eval()


def outputs(model: MemoryTransformerLM, segments: list[torch.Tensor]) -> list[torch.Tensor]:
    """Log-probabilities of consecutive segments, the memory carried from one to the next."""
    memory, result = None, []
    with torch.no_grad():
        for ids in segments:
            out = model(ids, memory=memory)
            memory = out.memory
            result.append(out.log_probs)
    return result


@pytest.mark.parametrize("layer_type", ["all_attention", "transformer_xl"])
def test_a_pruned_model_round_trips_with_its_layout_and_identical_outputs(tmp_path, layer_type):
    model = pruned_model(layer_type)
    model.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["README.md", "config.json",
                                                                       "model.safetensors"]
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["heads_per_layer"] == [2, 0, 4] and config["head_ids"] == [[1, 3], [], [0, 1, 2, 3]]

    loaded = MemoryTransformerLM.from_pretrained(tmp_path / "export")
    assert loaded.heads_per_layer == [2, 0, 4] and loaded.head_ids == model.head_ids
    assert loaded.gates_enabled and not loaded.training
    assert loaded.config == model.config
    segments = [torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    for ours, theirs in zip(outputs(model, segments), outputs(loaded, segments), strict=True):
        assert torch.equal(ours, theirs)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_a_dense_model_with_a_tied_full_softmax_round_trips(tmp_path):
    model = tiny_model(cutoffs=[], div_value=1.0).eval()
    model.save_pretrained(tmp_path)
    loaded = MemoryTransformerLM.from_pretrained(tmp_path, attn_impl="reference")  # a non-shape override
    assert loaded.config.attn_impl == "reference" and not loaded.gates_enabled
    ids = torch.randint(0, VOCAB, (1, 8))
    torch.testing.assert_close(outputs(loaded, [ids])[0], outputs(model, [ids])[0])


def test_the_model_card_names_the_layout_size_perplexity_and_command(tmp_path):
    model = pruned_model("all_attention")
    model.save_pretrained(tmp_path, model_card_kwargs={"test_ppl": 123.456, "command": "headprune fit --config x"})
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: headprune" in card
    assert "| Heads per layer | [2, 0, 4] (6 of 12) |" in card
    assert f"{model.num_parameters(include_embeddings=True):,}" in card
    assert "| Test perplexity | 123.46 |" in card and "headprune fit --config x" in card


@pytest.mark.parametrize("change, message", [
    ({"d_model": 32}, r"model\.safetensors does not match config\.json"),
    ({"heads_per_layer": [4, 0, 4]}, r"model\.safetensors does not match config\.json"),
    ({"head_ids": [[0, 1], [], [0, 1, 2, 3]]}, "the weights hold heads"),
    ({"layer_type": "lstm"}, "does not describe a model this version can build"),
    ({"headprune_export_format": 99}, "this version reads 1"),
])
def test_a_folder_whose_weights_do_not_match_its_config_is_one_clear_line(tmp_path, change, message):
    pruned_model("all_attention").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(ValueError, match=message) as error:
        MemoryTransformerLM.from_pretrained(tmp_path)
    assert "\n" not in str(error.value)


def test_truncated_weights_are_one_clear_line(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors does not match config\.json") as error:
        MemoryTransformerLM.from_pretrained(tmp_path)
    assert "\n" not in str(error.value)


def test_the_export_command_turns_a_pruned_checkpoint_into_a_folder_that_loads_without_lightning(tmp_path):
    module = LanguageModel(pruned_model("transformer_xl"))
    checkpoint = {"state_dict": module.state_dict(), "pytorch-lightning_version": pl.__version__}
    module.on_save_checkpoint(checkpoint)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "logs" / "version_0").mkdir(parents=True)
    (run / "logs" / "version_0" / "config.yaml").write_text("trainer: {max_steps: 3}\n")
    torch.save(checkpoint, run / "checkpoints" / "pruned.ckpt")

    export_main([str(run / "checkpoints" / "pruned.ckpt"), str(tmp_path / "export"), "--test_ppl", "42.5"])
    out = tmp_path / "export"
    assert (out / "training_config.yaml").read_text() == "trainer: {max_steps: 3}\n"
    card = (out / "README.md").read_text()
    assert "headprune fit --config training_config.yaml" in card and "| Test perplexity | 42.50 |" in card

    script = (f"import sys, torch; from lightning_modules.model import MemoryTransformerLM; "
              f"m = MemoryTransformerLM.from_pretrained({str(out)!r}); "
              f"assert 'pytorch_lightning' not in sys.modules and 'lightning' not in sys.modules; "
              f"print(m.heads_per_layer, m.head_ids)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[2, 0, 4] [[1, 3], [], [0, 1, 2, 3]]"
    loaded = MemoryTransformerLM.from_pretrained(out)
    segments = [torch.randint(0, VOCAB, (2, 8)) for _ in range(2)]
    for ours, theirs in zip(outputs(module.model.eval(), segments), outputs(loaded, segments), strict=True):
        assert torch.equal(ours, theirs)


def test_the_export_command_reports_a_bad_checkpoint_on_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(tmp_path / "missing.ckpt"), str(tmp_path / "export")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("headprune export: error: checkpoint") and err.count("\n") == 1
    assert not (tmp_path / "export").exists()
