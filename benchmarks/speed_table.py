"""The markdown tables speed.py prints: one row per run with its ratios against transformers, and the
fused-projection micro-table. Rendering only: the numbers come from speed.py's children (run dicts, see
speed.run_child) and from yardsticks.py.

Checked against: speed.py before these tables moved here, whose stdout they reproduce byte for byte on the
same run dicts (CPU and CUDA layouts, with --ablate and --repeat).
"""

from __future__ import annotations

GB = 1e9


def format_table(results: list[dict], ceilings: dict[str, float]) -> str:
    """One row per run. ceilings: dtype -> bytes/s that bound decode (gemv on CPU, copy on CUDA)."""
    theirs = {r["dtype"]: r for r in results if r["impl"] == "transformers"}
    cpu = all(r["device"] == "cpu" for r in results)
    fastest = max(theirs.values(), key=lambda r: r["decode_tok_s"], default=None)
    hf32 = theirs.get("float32")
    head = ["impl", "dtype", "threads", "load s", "peak RSS GB", "RSS / weights", "TTFT s", "decode tok/s",
            "% of decode ceiling", "TTFT ours/HF", "decode ours/HF"]
    if cpu:
        head += ["TTFT vs HF float32", f"decode vs HF fastest ({fastest['dtype'] if fastest else '-'})"]
    else:
        head[5:5] = ["peak CUDA GB"]
        head += ["decode vs HF static"]
    sizes = sorted({b for r in results for b in r.get("images_s", {})}, key=int)
    head += [f"img/s B={b}" for b in sizes]
    static = next((r for r in results if r["impl"] == "transformers-static"), None)
    head.append("same tokens as HF")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ours = not r["impl"].startswith("transformers")
        ref = theirs.get(r["dtype"]) if ours else None
        name = r["impl"] + (f" ({r['variant']})" if r["variant"] else "")
        ceiling = ceilings.get(r["dtype"])
        cells = [name, r["dtype"], str(r["threads"]), f"{r['load_s']:.1f}", f"{r['peak_rss'] / GB:.2f}",
                 f"{r['peak_rss'] / r['weight_bytes']:.2f}", f"{r['ttft_s']:.3f}", f"{r['decode_tok_s']:.2f}",
                 f"{100 * r['decode_bytes'] * r['decode_tok_s'] / ceiling:.0f}%" if ceiling else "",
                 f"{r['ttft_s'] / ref['ttft_s']:.2f}" if ref else "",
                 f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}" if ref else ""]
        if cpu:
            cells += [f"{r['ttft_s'] / hf32['ttft_s']:.2f}" if ours and hf32 else "",
                      f"{r['decode_tok_s'] / fastest['decode_tok_s']:.2f}" if ours and fastest else ""]
        else:
            cells[5:5] = [f"{r['peak_cuda'] / GB:.2f}"]
            cells.append(f"{r['decode_tok_s'] / static['decode_tok_s']:.2f}" if ours and static else "")
        cells += [f"{r['images_s'][b]:.1f}" if b in r["images_s"] else "" for b in sizes]
        cells.append(("yes" if r["ids"] == ref["ids"] else "no") if ref else "")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def projection_table(rows: list[list[str]]) -> str:
    """The fused-projection micro-table (yardsticks.projection_micro's rows), with its caption."""
    lines = ["Fusing projections (ms per decoder layer, PaliGemma-3B shapes; fused = one matmul over the stacked "
             "weights):", "", "| projections | dtype | phase | separate ms | fused ms | saved |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
