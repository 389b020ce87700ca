"""Optional figure: per-GPU load and the cross-layer GPU traffic matrix (matplotlib imported lazily)."""
from __future__ import annotations

import numpy as np

from .metrics import gpu_traffic
from .placement import Placement
from .stats import trace_stats
from .topology import Topology

__all__ = ["plot_placement", "placement_figure"]


def plot_placement(placement: Placement, data, topo: Topology | None, path) -> None:
    """Write a PNG of :func:`placement_figure` to ``path``."""
    fig = placement_figure(placement, data, topo)
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=110)
    plt.close(fig)


def placement_figure(placement: Placement, data, topo: Topology | None = None):
    """Left, tokens per GPU per layer (heatmap) and its max/mean; right, expert pairs between GPU
    g1 (layer l) and GPU g2 (layer l+1) summed over layers. Colour scales start at 0 (a scale
    starting at the smallest value makes a 2 % imbalance look like black against yellow) and
    their bars name the unit. ``data``: a trace or stats (see ``trace_stats``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'moekit[plot]'") from None
    st = trace_stats(data)
    gl = placement.gpu_loads(st.loads)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    im = axes[0].imshow(gl.T, aspect="auto", cmap="viridis", vmin=0)
    axes[0].set_xlabel("MoE layer")
    axes[0].set_ylabel("GPU")
    if placement.num_gpus <= 16:
        axes[0].set_yticks(range(placement.num_gpus))
    ratio = gl.max(1).sum() / max(gl.mean(1).sum(), 1e-300)
    axes[0].set_title(f"tokens per GPU (max/mean {ratio:.3f})")
    fig.colorbar(im, ax=axes[0], label="token-expert assignments per layer")
    if st.trans is not None:
        T = gpu_traffic(placement, st.trans).sum(axis=0)
        im2 = axes[1].imshow(T, cmap="magma", vmin=0)
        cross = 1 - np.trace(T) / max(T.sum(), 1e-300)
        axes[1].set_title(f"layer l -> l+1 expert pairs by GPU (cross-GPU {cross:.3f})")
        axes[1].set_xlabel("GPU at layer l+1")
        axes[1].set_ylabel("GPU at layer l")
        if placement.num_gpus <= 16:
            axes[1].set_xticks(range(placement.num_gpus))
            axes[1].set_yticks(range(placement.num_gpus))
        fig.colorbar(im2, ax=axes[1], label="expert pairs (tokens x K x K), all layers")
    else:
        axes[1].text(0.5, 0.5, "no token-aligned trace:\nno cross-layer traffic", ha="center", va="center")
        axes[1].set_axis_off()
    fig.suptitle(f"{placement.meta.get('method', 'placement')}: {placement.num_gpus} GPUs x "
                 f"{placement.slots_per_gpu} slots")
    fig.tight_layout()
    return fig
