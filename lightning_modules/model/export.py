"""A standalone export of a MemoryTransformerLM in the Hugging Face hub's conventions: ``config.json`` (every
setting plus the head layout) and ``model.safetensors`` (the weights, no pickle), with a model card (``README.md``).

:class:`PretrainedMixin` is huggingface_hub's ``PyTorchModelHubMixin`` taught the head layout, so
``model.save_pretrained(dir)``, ``MemoryTransformerLM.from_pretrained(dir or repo id)`` and ``model.push_to_hub(repo)``
work on pruned models too: loading builds the model from the settings, removes heads down to the recorded layout,
then loads the weights strictly. Plain PyTorch: no Lightning is needed to load an export (docs/export.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import ModelCard, PyTorchModelHubMixin, constants, hf_hub_download

from lightning_modules.model.config import ModelConfig

EXPORT_FORMAT = 1
# config.json entries beside the model settings: the head layout of a pruned model and the gating switch
LAYOUT_KEYS = ("heads_per_layer", "head_ids", "gates_enabled")
FORMAT_KEY = "headprune_export_format"

MODEL_CARD = """---
{{ card_data }}
---

# {{ title }}

{{ layer_type_name }} language model (Transformer-XL style, with recurrence memory) trained with headprune,
which prunes attention heads layer by layer. {{ pruning_note }}

| | |
|---|---|
| Layer type | `{{ layer_type }}`: {{ n_layers }} layers, d_model {{ d_model }}, heads of width {{ d_head }} |
| Heads per layer | {{ heads_per_layer }} ({{ heads }} of {{ total_heads }}) |
| Parameters | {{ params_total }} ({{ params_non_embedding }} outside the embeddings) |
| MACs per token | {{ macs_per_token }} (FLOPs = 2 x MACs) |
| Vocabulary | {{ vocab_size }} word types |
| Context | segments of {{ tgt_len }} tokens, memory of {{ mem_len }} |
| Test perplexity | {{ test_ppl | default("not measured", true) }} |

## How it was trained

```
{{ command | default("(not recorded)", true) }}
```

## Use

```python
from lightning_modules.model import MemoryTransformerLM

model = MemoryTransformerLM.from_pretrained("{{ model_id | default("path/to/this/folder", true) }}")
out = model(input_ids)  # log-probabilities [B, T, V] and the memory to pass to the next segment
```

`config.json` holds every model setting and the head layout (`heads_per_layer`, `head_ids`, `gates_enabled`);
`model.safetensors` the weights at their pruned shapes.
"""

T = TypeVar("T", bound="PretrainedMixin")


def export_config(model: Any) -> dict[str, Any]:
    """The ``config.json`` of ``model``: its settings (``ModelConfig.to_dict()``) and head layout."""
    return {**model.config.to_dict(), "heads_per_layer": model.heads_per_layer, "head_ids": model.head_ids,
            "gates_enabled": model.gates_enabled, FORMAT_KEY: EXPORT_FORMAT}


class PretrainedMixin(
    PyTorchModelHubMixin,
    library_name="headprune",
    tags=["language-modeling", "transformer-xl", "all-attention", "head-pruning"],
    model_card_template=MODEL_CARD,
):
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for MemoryTransformerLM, head layout included.

    ``save_pretrained(dir, model_card_kwargs={"test_ppl": ..., "command": ...})`` fills the model card's test
    perplexity and training command (an existing ``README.md`` in ``dir`` is kept, as in huggingface_hub).
    ``from_pretrained(dir_or_repo_id, map_location="cpu", **settings)`` may override settings that do not fix
    shapes (e.g. ``attn_impl``); a folder whose weights do not match its config is a one-line ``ValueError``.
    """

    def _save_pretrained(self, save_directory: Path) -> None:
        super()._save_pretrained(save_directory)  # model.safetensors (shared tensors stored once)
        config = json.dumps(export_config(self), indent=2, sort_keys=True)
        (save_directory / constants.CONFIG_NAME).write_text(config + "\n", encoding="utf-8")

    @classmethod
    def _from_pretrained(
        cls: type[T],
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        config: dict[str, Any] | None = None,
        **model_kwargs: Any,
    ) -> T:
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        if config is None:
            raise ValueError(f"{model_id} has no {constants.CONFIG_NAME}: is it a headprune export "
                             "(MemoryTransformerLM.save_pretrained)?")
        if config.get(FORMAT_KEY) != EXPORT_FORMAT:
            raise ValueError(f"{model_id}: {constants.CONFIG_NAME} has {FORMAT_KEY}={config.get(FORMAT_KEY)!r}; "
                             f"this version reads {EXPORT_FORMAT}")
        fields = set(ModelConfig.field_names())
        unknown = sorted(set(model_kwargs) - fields - {*LAYOUT_KEYS, FORMAT_KEY})
        if unknown:
            raise TypeError(f"from_pretrained got unknown arguments {unknown}")
        settings = {k: v for k, v in config.items() if k in fields}
        settings |= {k: v for k, v in model_kwargs.items() if k in fields}
        try:
            model = cls.from_config(ModelConfig.from_dict(settings))  # type: ignore[attr-defined]
            model.shrink_to(config["heads_per_layer"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{model_id}: {constants.CONFIG_NAME} does not describe a model this version can "
                             f"build ({type(error).__name__}: {error})") from error
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, constants.SAFETENSORS_SINGLE_FILE)
        else:
            weights = hf_hub_download(repo_id=model_id, filename=constants.SAFETENSORS_SINGLE_FILE, revision=revision,
                                      cache_dir=cache_dir, force_download=force_download, token=token,
                                      local_files_only=local_files_only)
        try:
            load_model(model, weights, strict=strict, device=map_location)
        except (RuntimeError, OSError, SafetensorError) as error:  # shapes or names differ, file missing or torn
            first = " ".join(str(error).split())[:400]
            raise ValueError(f"{model_id}: {constants.SAFETENSORS_SINGLE_FILE} does not match {constants.CONFIG_NAME}"
                             f" ({first}); re-export the model, the weights and the config together") from error
        if model.head_ids != config.get("head_ids", model.head_ids):
            raise ValueError(f"{model_id}: the weights hold heads {model.head_ids}, {constants.CONFIG_NAME} says "
                             f"{config['head_ids']}; re-export the model")
        model.gates_enabled = bool(config.get("gates_enabled", False))
        model.eval()
        return model

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The model card: the model's size and head layout, and the ``test_ppl`` and ``command`` passed in."""
        cfg, heads = self.config, self.heads_per_layer  # type: ignore[attr-defined]
        total = cfg.n_heads * cfg.n_layers
        details = {
            "title": kwargs.pop("title", None) or f"headprune {cfg.layer_type} LM ({sum(heads)} of {total} heads)",
            "layer_type": cfg.layer_type,
            "layer_type_name": "An All-attention" if cfg.layer_type == "all_attention" else "A Transformer-XL",
            "n_layers": cfg.n_layers, "d_model": cfg.d_model, "d_head": cfg.d_head, "vocab_size": cfg.vocab_size,
            "tgt_len": cfg.tgt_len, "mem_len": cfg.mem_len, "heads_per_layer": heads, "heads": sum(heads),
            "total_heads": total,
            "params_total": f"{self.num_parameters(include_embeddings=True):,}",  # type: ignore[attr-defined]
            "params_non_embedding": f"{self.num_parameters(include_embeddings=False):,}",  # type: ignore[attr-defined]
            "macs_per_token": f"{int(self.macs_per_token()['total']):,}",  # type: ignore[attr-defined]
            "pruning_note": (f"{total - sum(heads)} of its {total} heads were removed; the weights are stored at "
                             "the pruned shapes." if sum(heads) < total else "No head was removed."),
        }
        test_ppl = kwargs.pop("test_ppl", None)
        details["test_ppl"] = None if test_ppl is None else f"{float(test_ppl):.2f}"
        return super().generate_model_card(*args, **details, **kwargs)
