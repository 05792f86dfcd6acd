"""The site's figures, drawn with matplotlib: ``python tools/figures.py --out DIR``.

tools/build_docs.py calls ``draw_all`` at build time; no figure is committed. Each
figure is an SVG with fixed metadata, so the same matplotlib writes the same bytes.

- bilinear_cell.svg: a sample p in its cell, the four corners (y0, x0), (y0, x1),
  (y1, x0), (y1, x1) and their weights hy hx, hy lx, ly hx, ly lx;
- offset_layout.svg: torchvision's offset channels, (off_y, off_x) interleaved per tap
  and group, beside what the seed's ``.view(b*c, h, w, 2)`` reads from the same memory;
- border_p_minus_1.svg: the offset gradient's support on either side of p = -1 in the
  two conventions (``border_grad="torchvision"`` and ``"mmcv"``);
- multihead_split.svg: the split of (L, heads * E) into heads, and one head's attention
  map P computed by npattn's scaled_dot_product_attention on a seeded input;
- sk_paths.svg: SKConv's two paths, their sum, the squeeze and the softmax selection;
- aff_fusion.svg: AFF's fusion of x and the residual through MS_CAM's gate.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

NAMES = ("bilinear_cell", "offset_layout", "border_p_minus_1", "multihead_split", "sk_paths", "aff_fusion")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "npattn", "svg.fonttype": "path", "font.size": 10})
    return plt


def _save(fig, path):
    fig.savefig(path, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)


def bilinear_cell(path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    ly, lx = 0.35, 0.6
    ax.add_patch(plt.Rectangle((0, 0), 1, 1, fill=False, lw=1.5))
    # each corner's weight is the area of the rectangle diagonally opposite it
    ax.add_patch(plt.Rectangle((lx, ly), 1 - lx, 1 - ly, color="tab:blue", alpha=0.12))
    ax.text((1 + lx) / 2, (1 + ly) / 2, f"area hy hx\n= weight of (y0, x0)", ha="center", va="center", fontsize=8,
            color="tab:blue")
    for dy in (0, 1):
        for dx in (0, 1):
            ax.plot(dx, dy, "o", color="black", ms=8)
            name = f"({'y1' if dy else 'y0'}, {'x1' if dx else 'x0'})"
            w = f"{'ly' if dy else 'hy'} {'lx' if dx else 'hx'}"
            val = (ly if dy else 1 - ly) * (lx if dx else 1 - lx)
            ax.annotate(f"{name}\nweight {w} = {val:.2f}", (dx, dy), textcoords="offset points",
                        xytext=(0, 12 if dy == 0 else -30), ha="center", fontsize=9)
    ax.plot([0, lx], [ly, ly], "--", color="gray", lw=1)
    ax.plot([lx, lx], [0, ly], "--", color="gray", lw=1)
    ax.text(lx / 2, ly - 0.03, f"lx = p_x - x0 = {lx}", ha="center", va="bottom", fontsize=8)
    ax.text(lx + 0.02, ly / 2, f"ly = p_y - y0 = {ly}", ha="left", va="center", fontsize=8)
    ax.plot(lx, ly, "*", color="tab:red", ms=14)
    ax.annotate("p = (p_y, p_x)", (lx, ly), xytext=(-12, -14), textcoords="offset points", color="tab:red", ha="right")
    ax.set_xlim(-0.45, 1.45)
    ax.set_ylim(1.35, -0.3)  # y grows downwards, as the rows of an image
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("bilinear sampling, hy = 1 - ly, hx = 1 - lx (y grows downwards)", fontsize=10)
    _save(fig, path)


def offset_layout(path, taps=3, groups=2):
    """Channels of an offset tensor (N, 2 G K, H, W) with G = groups, K = taps."""
    plt = _plt()
    n = 2 * groups * taps
    fig, axes = plt.subplots(2, 1, figsize=(9, 3.6))
    colors = plt.get_cmap("tab10")
    ax = axes[0]
    for ch in range(n):
        g, rest = divmod(ch, 2 * taps)
        k, comp = divmod(rest, 2)
        ax.add_patch(plt.Rectangle((ch, 0), 1, 1, color=colors(g), alpha=0.35 if comp else 0.7))
        ax.text(ch + 0.5, 0.5, f"{'x' if comp else 'y'}\ng{g} k{k}", ha="center", va="center", fontsize=8)
    ax.set_title(f"torchvision: channel 2 (g K + k) is off_y of tap k in group g, the next one off_x (G = {groups}, K = {taps})",
                 fontsize=9)
    ax = axes[1]
    # the seed: (b, 2c, h, w) memory read as (b*c, h, w, 2): consecutive memory pairs
    # (within one channel's h*w plane) become (y, x) of one position of one channel
    c = n // 2
    for ch in range(n):
        img, half = divmod(ch, 2)
        ax.add_patch(plt.Rectangle((ch, 0), 1, 1, color="tab:gray", alpha=0.25 + 0.2 * half))
        ax.text(ch + 0.5, 0.5, f"ch {ch}\n-> c {img}", ha="center", va="center", fontsize=8)
    ax.set_title(f"the seed's .view(b*c, h, w, 2) of (b, 2c, h, w), c = {c}: channels 2j, 2j+1 hold channel j's"
                 " positions, (y, x) of neighbouring pixels", fontsize=9)
    for ax in axes:
        ax.set_xlim(0, n)
        ax.set_ylim(0, 1)
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def border_p_minus_1(path):
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3), sharey=True)
    H = 4
    for ax, (name, closed) in zip(axes, [("torchvision", True), ("mmcv", False)]):
        ax.axvspan(-1, H, color="tab:green", alpha=0.12)
        ax.plot(range(H), [0] * H, "ks", ms=8, label="pixels 0 .. H-1")
        ax.plot([-1], [0], "o", ms=11, color="tab:red", fillstyle="full" if closed else "none", mew=2)
        ax.plot([H], [0], "o", ms=11, color="tab:red", fillstyle="none", mew=2)
        ax.annotate("p = -1", (-1, 0), xytext=(-1, 0.5), ha="center", arrowprops=dict(arrowstyle="->"))
        support = "[-1, H)" if closed else "(-1, H)"
        rule = "right-hand derivative at -1: nonzero" if closed else "0 at exactly -1"
        ax.set_title(f'border_grad="{name}": support {support}\n{rule}', fontsize=9)
        ax.set_xlim(-2, H + 1)
        ax.set_ylim(-1, 1)
        ax.set_yticks([])
        ax.set_xlabel("p_y (or p_x), H = 4")
    fig.suptitle("offset gradient support; the output and every other gradient are the same in both", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def multihead_split(path, L=6, heads=3, E=4, seed=0):
    from npattn.functional import scaled_dot_product_attention_forward

    plt = _plt()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, L, heads * E))
    q = x.reshape(1, L, heads, E).transpose(0, 2, 1, 3)  # (N, heads, L, E)
    k = rng.standard_normal((1, heads, L, E))
    v = rng.standard_normal((1, heads, L, E))
    _, cache = scaled_dot_product_attention_forward(q, k, v, is_causal=True)
    s = np.einsum("nhle,nhse->nhls", q, k) / np.sqrt(E)
    s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    P = np.exp(s - np.asarray(cache.lse)[..., None])  # the probabilities npattn's lse normalises
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [1.4, 1]})
    ax = axes[0]
    colors = plt.get_cmap("tab10")
    for h in range(heads):
        ax.add_patch(plt.Rectangle((h * E, 0), E, L, color=colors(h), alpha=0.3))
        ax.text(h * E + E / 2, -0.6, f"head {h}", ha="center")
    ax.set_xlim(0, heads * E)
    ax.set_ylim(L + 0.5, -1.2)
    ax.set_yticks(range(L + 1))
    ax.set_xlabel(f"features: heads * E = {heads} * {E}")
    ax.set_ylabel(f"tokens L = {L}")
    ax.set_title("(N, L, heads E) -> reshape (N, L, heads, E) -> transpose (N, heads, L, E)", fontsize=9)
    ax = axes[1]
    im = ax.imshow(P[0, 0], cmap="viridis", vmin=0, vmax=1)
    ax.set_title("head 0: P = softmax(S), causal (rows sum to 1)", fontsize=9)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, path)


def _box(ax, xy, text, w=1.6, h=0.6, color="tab:blue"):
    import matplotlib.pyplot as plt

    ax.add_patch(plt.Rectangle((xy[0] - w / 2, xy[1] - h / 2), w, h, color=color, alpha=0.2))
    ax.text(xy[0], xy[1], text, ha="center", va="center", fontsize=8)


def _arrow(ax, a, b, text=""):
    ax.annotate("", b, a, arrowprops=dict(arrowstyle="->", lw=1))
    if text:
        ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + 0.12, text, fontsize=7, ha="center")


def sk_paths(path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(12.5, 3.6))
    _box(ax, (0, 1), "x\n(N, C, H, W)", color="tab:gray")
    _box(ax, (2.2, 2), "conv 3x3, dil 1\nBN, ReLU: u0")
    _box(ax, (2.2, 0), "conv 3x3, dil 2\nBN, ReLU: u1", color="tab:orange")
    _box(ax, (4.4, 1), "u = u0 + u1", color="tab:gray")
    _box(ax, (6.4, 1), "s = mean_hw u\nz = ReLU(BN(Linear s))", w=2.1, color="tab:green")
    _box(ax, (8.6, 2), "a0 = softmax_i(W_i z)_0", w=2.0, color="tab:purple")
    _box(ax, (8.6, 0), "a1 = softmax_i(W_i z)_1", w=2.0, color="tab:purple")
    _box(ax, (10.8, 1), "y = a0 u0 + a1 u1", color="tab:gray")
    for a, b in [((0.8, 1.1), (1.4, 2)), ((0.8, 0.9), (1.4, 0)), ((3.0, 2), (3.6, 1.1)), ((3.0, 0), (3.6, 0.9)),
                 ((5.2, 1), (5.35, 1)), ((7.45, 1.1), (7.6, 2)), ((7.45, 0.9), (7.6, 0)), ((9.6, 2), (10.0, 1.1)),
                 ((9.6, 0), (10.0, 0.9))]:
        _arrow(ax, a, b)
    ax.set_xlim(-1, 11.8)
    ax.set_ylim(-0.6, 2.6)
    ax.axis("off")
    ax.set_title("SKConv, two paths: split, fuse, select (softmax over the paths, per channel)", fontsize=9)
    _save(fig, path)


def aff_fusion(path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(13, 3.4))
    _box(ax, (0, 2), "x", color="tab:gray", w=0.8)
    _box(ax, (0, 0), "residual", color="tab:gray", w=1.2)
    _box(ax, (2, 1), "xa = x + residual", w=1.8, color="tab:gray")
    _box(ax, (4.4, 2), "local: conv 1x1, BN, ReLU,\nconv 1x1, BN  (N, C, H, W)", w=2.6, color="tab:green")
    _box(ax, (4.4, 0), "global: mean_hw, conv 1x1, BN,\nReLU, conv 1x1, BN  (N, C, 1, 1)", w=2.6, color="tab:green")
    _box(ax, (7, 1), "w = sigmoid(xl + xg)", w=1.9, color="tab:purple")
    _box(ax, (9.7, 1), "y = 2 x w + 2 residual (1 - w)", w=2.6, color="tab:gray")
    for a, b in [((0.4, 2), (1.3, 1.15)), ((0.6, 0), (1.3, 0.85)), ((2.9, 1.1), (3.1, 2)), ((2.9, 0.9), (3.1, 0)),
                 ((5.7, 2), (6.05, 1.1)), ((5.7, 0), (6.05, 0.9)), ((7.95, 1), (8.4, 1))]:
        _arrow(ax, a, b)
    ax.set_xlim(-0.8, 11.2)
    ax.set_ylim(-0.6, 2.6)
    ax.axis("off")
    ax.set_title("AFF: MS_CAM's gate w weighs x against the residual (the published code's factor 2)", fontsize=9)
    _save(fig, path)


def draw_all(out) -> list[pathlib.Path]:
    """Draw every figure into the folder out; returns the files written."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in NAMES:
        p = out / f"{name}.svg"
        globals()[name](p)
        paths.append(p)
    return paths


def main(argv=None):
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's npattn
    ap = argparse.ArgumentParser(description="draw the site's figures")
    ap.add_argument("--out", required=True, type=pathlib.Path)
    args = ap.parse_args(argv)
    for p in draw_all(args.out):
        print(p)


if __name__ == "__main__":
    main()
