"""Render a headless Neovim screen grid (screen.json from shot.lua) as a PNG."""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

d = json.load(open(sys.argv[1]))
rows = d["rows"]
cols = max(len(r["text"]) for r in rows)
colors = {0: "#d8dee9", 15: "#a3be8c", 16: "#88c0d0", 43: "#b48ead", 48: "#b48ead", 41: "#2e3440", 49: "#6b7385"}
fig = plt.figure(figsize=(cols * 0.092, len(rows) * 0.24), dpi=110)
ax = fig.add_axes([0, 0, 1, 1])
ax.set_xlim(0, cols)
ax.set_ylim(len(rows) + 0.5, -0.5)
ax.axis("off")
fig.patch.set_facecolor("#2e3440")
cr, cc = d["cursor"]
for y, r in enumerate(rows):
    if y == len(rows) - 1:
        ax.add_patch(plt.Rectangle((0, y - 0.5), cols, 1, color="#d8dee9"))
    for x, ch in enumerate(r["text"]):
        a = r["attrs"][x]
        if y == cr - 1 and x == cc:
            ax.add_patch(plt.Rectangle((x, y - 0.45), 0.12, 0.9, color="#eceff4"))
        if ch.strip():
            ax.text(x + 0.5, y, ch, family="DejaVu Sans Mono", fontsize=10, ha="center", va="center",
                    color=colors.get(a, "#d8dee9"), style="italic" if a == 49 else "normal")
fig.savefig(sys.argv[2], facecolor=fig.get_facecolor())
