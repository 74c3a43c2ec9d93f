"""Pack a manifest's samples into streaming shards (litdata chunks, ``multimoe.data.shards``):

    python -m multimoe.data.pack MANIFEST OUT_DIR [--chunk-bytes 64MB] [--workers 1]

Then train from them with ``python train.py fit ... --data.train_shards OUT_DIR`` (or the URL the folder was
uploaded to). Every row is checked first, as for training from the manifest; a bad row stops the packing
with its file, line and field.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from multimoe.data.manifest import ManifestError, label_set, read_manifest
from multimoe.data.shards import META, encode, litdata
from multimoe.tokenizer import SPECIALS, WordTokenizer


def pack(
    manifest: str | Path, out: str | Path, chunk_bytes: str = "64MB", workers: int = 1
) -> dict[str, Any]:
    """Write the shards of ``manifest`` to the folder ``out``; returns what ``multimoe.json`` holds."""
    rows = read_manifest(Path(manifest))
    texts = [t for row in rows for t in [row.text or "", *row.captions]]
    meta = {
        "samples": len(rows),
        "labels": label_set(rows),
        "words": WordTokenizer.build(texts).vocab[len(SPECIALS) :],
        "manifest": Path(manifest).name,
    }
    litdata().optimize(
        fn=encode,
        inputs=rows,
        output_dir=str(out),
        chunk_bytes=chunk_bytes,
        num_workers=workers,
        reorder_files=False,
        keep_data_ordered=True,
        mode="overwrite",
        verbose=False,
    )
    index = json.loads((Path(out) / "index.json").read_text())
    written = sum(chunk["chunk_size"] for chunk in index["chunks"])
    if written != len(rows):  # litdata's workers report their failures on stderr only
        raise RuntimeError(f"{out}: litdata wrote {written} of {len(rows)} samples; see the errors above")
    (Path(out) / META).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m multimoe.data.pack", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("manifest", help="a .jsonl or .csv manifest")
    parser.add_argument("out", help="folder to write the shards to (emptied first)")
    parser.add_argument("--chunk-bytes", default="64MB", help="size of each chunk file (default 64MB)")
    parser.add_argument("--workers", type=int, default=1, help="processes that read the files")
    args = parser.parse_args(argv)
    try:
        meta = pack(args.manifest, args.out, args.chunk_bytes, args.workers)
    except (ManifestError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    size = sum(p.stat().st_size for p in Path(args.out).iterdir())
    print(f"packed {meta['samples']:,} samples into {args.out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
