"""Per-layer head maps of a gated or pruned model: rows for a CSV, and a small heat-map image."""

import math

import numpy as np

from lightning_modules.model import MemoryTransformerLM

# colours of the image: an open head shades from pale to full green with its gate strength
SHUT_RGB = (230, 120, 40)
REMOVED_RGB = (40, 40, 40)


def head_map_rows(model: MemoryTransformerLM, step: int) -> list[dict]:
    """One row per original head: step, layer, head, log_alpha (NaN once removed) and state
    (``open``, ``shut`` or ``removed``)."""
    rows = []
    for i, (layer, keep) in enumerate(zip(model.layers, model.head_keep_mask(), strict=True)):
        present = {int(h): pos for pos, h in enumerate(layer.attn.head_ids.tolist())}
        for head in range(model.config.n_heads):
            if head in present:
                value = float(layer.gate.log_alpha[present[head]].detach())
                state = "open" if keep[present[head]] else "shut"
            else:
                value, state = math.nan, "removed"
            rows.append({"step": step, "layer": i, "head": head, "log_alpha": value, "state": state})
    return rows


def head_map_image(model: MemoryTransformerLM, cell: int = 16) -> np.ndarray:
    """RGB uint8 image, one ``cell`` x ``cell`` square per head (rows: layers, columns: original heads)."""
    rows = head_map_rows(model, step=0)
    image = np.zeros((model.n_layers, model.config.n_heads, 3), dtype=np.uint8)
    for row in rows:
        if row["state"] == "removed":
            colour = REMOVED_RGB
        elif row["state"] == "shut":
            colour = SHUT_RGB
        else:
            strength = 1 / (1 + math.exp(-row["log_alpha"]))  # 0.5 .. 1
            colour = (int(200 * (1 - strength) * 2), int(120 + 135 * strength), int(200 * (1 - strength) * 2))
        image[row["layer"], row["head"]] = colour
    return image.repeat(cell, axis=0).repeat(cell, axis=1)
